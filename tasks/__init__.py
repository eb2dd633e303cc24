"""vggprice's work: plain functions that tests call directly, with thin Prefect task wrappers."""

__version__ = "0.1.0"
