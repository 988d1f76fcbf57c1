"""Prefect flows over warehouse tables, built on the emdask library.

Flows (each also a command of the ``emdask`` console script):

* ``impute-survey`` (:func:`pipelines.impute.impute_survey`): fill missing answers.
* ``segment-customers`` (:func:`pipelines.segment.segment_customers`): segments by mixture model.
* ``segment-image`` (:func:`pipelines.image.segment_image`): segment an image by colour.

Every flow reads its source without modifying it (:mod:`pipelines.sources`: local files, object
storage, Iceberg and Delta tables, PostgreSQL), checks its data (:mod:`pipelines.validation`) and
publishes a new, validated version of its destination in one step (:mod:`pipelines.versions`).
"""

from .lifecycle import die_with_server as _die_with_server

_die_with_server()  # a flow run of 'emdask serve' ends with it (see pipelines.lifecycle)
