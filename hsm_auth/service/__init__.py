"""The online verifier: an HTTP service over :class:`hsm_auth.verifier.Verifier`
(``hsm-auth serve``), on FastAPI and uvicorn (extra ``service``).

Nothing in the core library or the CLI imports this package at import time: the
CLI imports it lazily in ``serve``. :func:`hsm_auth.service.app.create_app` builds
the application; route modules each expose ``router`` and take the
:class:`~hsm_auth.service.context.ServiceContext` through
:func:`~hsm_auth.service.context.get_context`.
"""
