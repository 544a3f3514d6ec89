"""The Functions app: one FunctionApp, one blueprint per trigger in `functions/`.

Heavy libraries (azure.ai.ml, torch, transformers, pandas, the storage SDKs) are imported only
inside the code paths that use them, so a cold start pays for none of them.
"""

import azure.functions as func

from functions.intake import bp as intake
from functions.janitor import bp as janitor
from functions.job_events import bp as job_events
from functions.status import bp as status
from shared.settings import get_settings

# Fail at start-up, naming the setting, rather than at the first upload.
get_settings()

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
for blueprint in (intake, job_events, janitor, status):
    app.register_functions(blueprint)
