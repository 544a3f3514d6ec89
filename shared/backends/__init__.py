"""The backends that train, register and serve models: `interface.py` (what every backend does,
and the values they exchange), `registry.py` (which backends exist; each is imported only when
used), `smoke.py` (the `/score` request and answer shapes, tried in turn, shared by both), and
one package per backend."""
