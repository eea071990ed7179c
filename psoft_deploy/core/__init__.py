"""The core every other layer builds on: the PSOFT math (`psoft`, `layer`), the adapter formats and
their factors (`formats`, `factors`, `materialize`), the base checkpoint and models (`base`,
`model`, `architectures`), dtypes, options, outputs and errors. It imports nothing from the
converters, serve or the commands (`tests/test_code.py`)."""

__version__ = "0.1.0"
