"""One settings object for vggprice, read from VGGPRICE_* environment variables.

Secrets (AWS keys) are never fields here: boto3 reads them from the standard
AWS chain (environment, shared config, instance role) or a Prefect block, so
nothing in this object is ever a secret and it is safe to log or store.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where the store is and where the data comes from."""

    model_config = SettingsConfigDict(env_prefix="VGGPRICE_", extra="ignore")

    store: str = Field("./lake", description="s3://bucket/prefix or a local directory")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; falls back to AWS_ENDPOINT_URL"
    )
    s3_region: str | None = Field(None, description="falls back to AWS_REGION / AWS_DEFAULT_REGION")
    data_source: str | None = Field(
        None, description="directory with the four Fashion-MNIST IDX files"
    )

    def endpoint_url(self) -> str | None:
        return self.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    def region(self) -> str:
        return (
            self.s3_region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with non-None flow/CLI parameters on top."""
    settings = Settings()
    given = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update=given) if given else settings


def default_cache_dir() -> Path:
    return Path(os.environ.get("VGGPRICE_CACHE_DIR", Path.home() / ".cache" / "vggprice"))
