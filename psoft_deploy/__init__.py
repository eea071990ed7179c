"""psoft-deploy: take trained PSOFT adapters to production, exactly. The package's layers, each
importing only those below it: `psoft_deploy.core`, `psoft_deploy.converters`, `psoft_deploy.serve`,
and the commands here (`cli`, `demo`, `train`, `train_jobs`) with the test kit (`testing`)."""

from .core import __version__

__all__ = ["__version__"]
