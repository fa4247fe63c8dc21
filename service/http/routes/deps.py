"""Dependency aliases shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fedpersona.service.state import Services, get_services

ServicesDep = Annotated[Services, Depends(get_services)]
