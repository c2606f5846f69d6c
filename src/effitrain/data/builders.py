"""The data group's builders, registered on import: the text sources' (data/corpus.py) and the fine-tuning
options' (data/records.py, which reads files through corpus.py's helpers)."""

from effitrain.data import corpus, records  # noqa: F401 (registration)
