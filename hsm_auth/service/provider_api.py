"""The service provider's API (API keys, :mod:`hsm_auth.service.auth`)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["provider"])
