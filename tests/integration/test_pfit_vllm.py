"""PFIT through the gateway, with the real vLLM server of the session: a user's answers come
from their own PFIT adapter.

One short PFIT round on the micro model, driven with the same pieces a Flower round runs (the
client's `Method.client_update` and its personal publish, the server's aggregate and
`RoundPublisher`), for two users whose reward mixes the operator set through the gateway's admin
API. Then each user asks through the gateway: the answer is what vLLM gives for exactly the
`users/<u>/served` version this round published, and vLLM's log-probabilities under it equal
transformers + PEFT with the round's global LoRA and that user's personal LoRA applied together.

Cost beyond the shared vLLM server: the micro reward models and two clients' RL round (about
2.5 min on a loaded 2-core machine); that round is what is under test, so it is not faked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from fedpersona.adapters import Slot
from fedpersona.adapters.preferences import effective_preferences
from fedpersona.adapters.refs import engine_adapter_name

if TYPE_CHECKING:  # only for annotations: several conftest.py files share the module name
    from conftest import GatewayUnderTest

pytestmark = pytest.mark.vllm

ADMIN_KEY = "integration-admin-key-0123456789"  # tests/integration/conftest.py's
MIXES = {"alice": 1.0, "bob": 0.0}
PROMPT = [{"role": "user", "content": "How do I cook rice?"}]
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 12, "seed": 0}
TEXT = "To be, or not to be, that is the question"
# vLLM (CPU, float32) against transformers + PEFT; measured for a composed adapter: 4.8e-07.
LOGPROB_TOLERANCE = 1e-4


@dataclass
class Round:
    served: dict[str, str]  # user -> served version id this round published
    global_version: str
    personal: dict[str, str]  # user -> personal version id the client published
    mixes: dict[str, float]  # user -> the reward mix the client trained with


@pytest.fixture(scope="module")
def pfit_round(
    gateway: GatewayUnderTest, micro_models: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Round]:
    from fedpersona.trainer.data.personas import write_silos
    from fedpersona.trainer.flower.strategy import Participant
    from fedpersona.trainer.methods import LoraSpec, TrainConfig, get_method
    from fedpersona.trainer.models.rewards import MICRO_REWARDS, build_reward_models
    from fedpersona.trainer.rounds.publish import RoundPublisher, publish_personal

    work = tmp_path_factory.mktemp("pfit-vllm")
    build_reward_models(work / "rewards", MICRO_REWARDS)
    silos = write_silos(work / "silos", {u: "chef" for u in MIXES}, n_train=4, n_eval=2)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for user, lam in MIXES.items():  # the operator sets each user's mix
        answer = httpx.patch(
            f"{gateway.root}/admin/users/{user}", json={"reward_mix": lam}, headers=admin
        )
        assert answer.status_code == 200, answer.text

    base = micro_models.large
    method = get_method(
        "pfit", spec=LoraSpec(rank=8, alpha=16.0), rewards_dir=str(work / "rewards")
    )
    start = method.init_global(base_model=base, seed=0)
    participants, mixes = [], {}
    for node, (user, silo) in enumerate(silos.items()):
        # What the ClientApp does: the user's mix from the store, a local round, its publish.
        lam = effective_preferences(gateway.store.root, user).reward_mix
        config = TrainConfig(
            steps=2, lr=5e-2, batch_size=2, max_len=64, seed=node, total_rounds=1, reward_mix=lam
        )
        update = method.client_update(
            base_model=base, silo=silo, global_params=start, state={}, config=config, round_idx=1
        )
        mixes[user] = update.metrics["reward_mix"]
        personal = publish_personal(
            gateway.store, method, user=user, base_model=base, state=update.state
        )
        participants.append(
            Participant(
                user=user,
                node_id=node,
                num_examples=update.num_examples,
                personal_version=personal,
                upload=update.upload,
                metrics=update.metrics,
            )
        )
    # What the ServerApp does: aggregate the uploads, publish global and served adapters.
    new_global = method.aggregate(
        previous=start, results=[(p.upload, p.num_examples) for p in participants]
    )
    publisher = RoundPublisher(
        store=gateway.store,
        method=method,
        base_model=base,
        algorithm="pfit",
        run_id="pfit-vllm",
        staging_root=work / "staging",
    )
    published = publisher(1, new_global, participants)
    assert published.global_version is not None
    yield Round(
        served=dict(published.served_versions),
        global_version=published.global_version,
        personal={p.user: str(p.personal_version) for p in participants},
        mixes=mixes,
    )


def _ask(gateway: GatewayUnderTest, user: str) -> str:
    client = openai.OpenAI(base_url=gateway.url, api_key=gateway.keys[user], max_retries=0)
    answer = client.chat.completions.create(model="personal", messages=PROMPT, **GREEDY)  # type: ignore[arg-type]
    return answer.choices[0].message.content or ""


def _direct(gateway: GatewayUnderTest, model: str) -> str:
    body = {"model": model, "messages": PROMPT, **GREEDY}
    return str(gateway.vllm.direct(body)["choices"][0]["message"]["content"])


def test_each_client_trained_with_the_mix_the_operator_set(pfit_round: Round) -> None:
    assert pfit_round.mixes == MIXES


def test_a_users_answers_come_from_their_pfit_adapter(
    gateway: GatewayUnderTest, pfit_round: Round, tmp_path: Path
) -> None:
    import torch
    from fedpersona.adapters import AdapterStore
    from peft import PeftModel
    from support.logprobs import complete, reference_logprobs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store: AdapterStore = gateway.store
    model_dir = gateway.vllm.model_dir
    prompt = AutoTokenizer.from_pretrained(model_dir)(TEXT)["input_ids"]
    base_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    global_dir = store.get(Slot.global_adapter("pfit"), pfit_round.global_version).path
    logprobs: dict[str, list[float]] = {}
    for user in MIXES:
        served = store.current(Slot.user_served(user))
        assert served is not None and served.id == pfit_round.served[user]
        assert served.rank == 8  # global rank 4 + personal rank 4, composed
        assert served.metadata["algorithm"] == "pfit"
        assert served.metadata["personal_version"] == pfit_round.personal[user]
        name = engine_adapter_name(user, served.id)

        # Through the gateway: exactly what vLLM answers under this user's served version.
        assert _ask(gateway, user) == _direct(gateway, name)
        assert name in gateway.vllm.registered()

        # And that version is the round's global LoRA plus this user's personal LoRA.
        tokens, got = complete(gateway.vllm, name, prompt)
        personal_dir = store.get(Slot.user_personal(user), pfit_round.personal[user]).path
        both: Any = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir), global_dir, adapter_name="g"
        )
        both.load_adapter(personal_dir, adapter_name="p")
        both.base_model.set_adapter(["g", "p"])
        want = reference_logprobs(both.eval(), prompt, tokens)
        diff = (want - torch.tensor(got)).abs().max().item()
        print(f"\n{user}: vLLM vs PEFT(global + personal) max |dlogprob| = {diff:.2e}")
        assert diff < LOGPROB_TOLERANCE
        moved = (reference_logprobs(base_model, prompt, tokens) - want).abs().max().item()
        assert moved > 10 * LOGPROB_TOLERANCE, f"{user}: the PFIT round left the model unchanged"
        logprobs[user] = got
    assert logprobs["alice"] != logprobs["bob"]  # personal parts differ: so do the users' models
