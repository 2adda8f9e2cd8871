"""/v1/models, the health probes and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from retro_peft.domains.registry import AUTO
from retro_peft.serving.dependencies import State, authorized
from retro_peft.serving.openapi import errors
from retro_peft.serving.schemas import Health, ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models", responses=errors(401, 429, 503), tags=["models"], dependencies=[Depends(authorized(None))])
async def models(state: State) -> ModelList:
    bank = state.require_model()
    cards = [ModelCard(id=name, created=state.created, description=state.descriptions.get(name),
                       adapter=d.adapter_dir is not None) for name, d in sorted(bank.domains.items())]
    cards.append(ModelCard(id=AUTO, created=state.created, description="route each question to a domain"))
    return ModelList(data=cards)


@router.get("/health/live", tags=["operations"])
async def live() -> Health:
    return Health(status="ok")


@router.get("/health/ready", tags=["operations"],
            responses={503: {"model": Health, "description": "loading, failed (a domain or the model) or draining"}})
async def ready(state: State, response: Response) -> Health:
    if state.status != "ok":
        response.status_code = 503
    return Health(status=state.status, domains=state.domains)


@router.get("/metrics", response_class=Response, tags=["operations"], dependencies=[Depends(authorized("admin"))],
            responses={**errors(401, 403, 429), 200: {"content": {CONTENT_TYPE_LATEST: {}},
                                                      "description": "Prometheus' text format"}})
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
