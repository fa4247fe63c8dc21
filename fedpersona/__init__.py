"""fedpersona: serve personalized LLMs trained by federated learning.

One import root for the three packages, which live in top-level folders of the repository:
`fedpersona.adapters` (the store: the contract between the other two), `fedpersona.trainer`
(Flower rounds) and `fedpersona.service` (the OpenAI-compatible gateway in front of vLLM). This
root package itself holds only what belongs to neither side: the command-line root (`cli`) and the
end-to-end demo (`demo`). See `docs/architecture.md` for the allowed imports.
"""

__version__ = "0.1.0"
