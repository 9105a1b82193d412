"""The HTTP server, a folder per feature (vLLM's ``entrypoints/openai`` pattern):

* ``generate/``, ``score/``, ``openai/``: each feature's ``protocol`` (its request and
  response models), ``serving`` (the work) and ``router`` (the routes);
* shared: ``app`` (the factory), ``protocol`` (the models the features share), ``serving``
  (what every engine route's service shares), ``routing`` (what every router shares),
  ``limits`` (admission and every other limit), ``lifecycle`` (the engine's states, /health,
  /ready, the checks before listening), ``run`` (``serve``: uvicorn, draining), ``metrics``
  (Prometheus, /metrics), ``middleware`` (request id, keys, body limit, access log), ``page``
  (the consensus page at /ui, static files in ``ui/``).

Errors are ``ivonserve.errors``'s: one module, one status per fault.
"""

from ivonserve.errors import ApiError
from ivonserve.server.app import create_app
from ivonserve.server.generate.serving import GenerationService
from ivonserve.server.lifecycle import EngineState, start_draining
from ivonserve.server.run import serve

__all__ = ["ApiError", "EngineState", "GenerationService", "create_app", "serve", "start_draining"]
