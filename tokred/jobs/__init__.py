"""The jobs behind the command line: generate, eval and sweep, the model sources they load, and result writing.

Each job's config holds a reduction config (:mod:`tokred.jobs.config`); the jobs reach tokred only through its
public API (``tokred.apply`` and friends).
"""
