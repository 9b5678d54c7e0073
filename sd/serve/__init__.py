"""`sd serve`: the service layer around the core (`sd.load`, `Pipeline`); the core never imports it.

    jobs.py         GenerationJob, what every API dialect hands the worker; its result; RequestError
    workers_ai.py   the Workers AI dialect: its JSON -> GenerationJob; results, errors, model search -> its replies
    a1111.py        the AUTOMATIC1111 API dialect (/sdapi/v1); a1111_names.py its sampler and schedule names
    openai.py       the OpenAI Images API dialect (/v1/images, /v1/models); multipart.py reads its edits'
                    bodies, image_files.py keeps the pictures it answers as URLs
    cache.py        registry models loaded on first use and kept while they fit; cheap source checks
    speed.py        how long a job takes on this device (measured), and the refusal of hopeless jobs
    worker.py       one device's bounded queue and the thread that runs its jobs, compatible ones batched; stoppable
    batching.py     which queued jobs share a UNet batch (never changing an answer), and how many images fit
    router.py       several devices behind one worker's interface: a job goes to the one with least to do
    metrics.py      GET /metrics in the Prometheus text format
    connections.py  slow clients: deadlines for headers and bodies, a cap on open connections
    app.py          the Starlette app: routes, handlers, the exception -> status table, the access log
    cli.py          `sd serve`: flags, startup checks, uvicorn, SIGTERM
    ray_app.py      the same app past one machine, on Ray Serve: a replica per GPU (`sd serve --ray`,
                    deploy/ray/serve.yaml; the ray extra, imported by nothing else)

Another dialect (OpenAI Images, AUTOMATIC1111) is one more module like workers_ai.py plus its
routes in app.py; queueing, limits, auth, logging and cancellation are shared.
"""
