"""psoft-deploy: take trained PSOFT adapters to production, exactly."""

__version__ = "0.1.0"
