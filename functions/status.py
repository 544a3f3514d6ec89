"""Run status over HTTP (what happened to my upload?), and rolling an endpoint back."""

import azure.functions as func

from shared.ledger import open_ledger
from shared.settings import get_settings
from shared.status import rollback_response, runs_response

bp = func.Blueprint()


@bp.function_name("run_status")
@bp.route(route="runs/{run_id?}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def run_status(req: func.HttpRequest) -> func.HttpResponse:
    response = runs_response(open_ledger(get_settings()), req.route_params.get("run_id"), dict(req.params))
    return func.HttpResponse(response.body, status_code=response.status, mimetype="application/json")


@bp.function_name("endpoint_rollback")
@bp.route(route="endpoints/{endpoint}/rollback", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def endpoint_rollback(req: func.HttpRequest) -> func.HttpResponse:
    settings = get_settings()
    response = rollback_response(settings, open_ledger(settings), req.route_params["endpoint"])
    return func.HttpResponse(response.body, status_code=response.status, mimetype="application/json")
