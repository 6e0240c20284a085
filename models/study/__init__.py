"""The reproduction study behind ``python -m models.reproduce`` (see :mod:`models.reproduce`).

One module per job: :mod:`.plan` (which runs), :mod:`.run` (train and score one run, run them
all in parallel, resumably), :mod:`.aggregate` (group the raw records, mean and spread),
:mod:`.tables` (verdicts and ``RESULTS.md``) and :mod:`.figures`.
"""
