"""vggprice's Prefect flows: they orchestrate; the work lives in ``tasks``."""
