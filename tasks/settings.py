"""One settings object for vggprice: the only code that reads the environment.

Secrets (AWS keys) are never fields here: boto3 reads them from the standard
AWS chain (environment, shared config files, instance or task role), so
nothing in this object is a secret and it is safe to log or store.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where the store is, where the data comes from, where the local caches live."""

    model_config = SettingsConfigDict(env_prefix="VGGPRICE_", extra="ignore", populate_by_name=True)

    store: str = Field("./lake", description="s3://bucket/prefix or a local directory")
    s3_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices("VGGPRICE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint (MinIO, Ceph RGW, R2); else AWS",
    )
    s3_region: str = Field(
        "us-east-1",
        validation_alias=AliasChoices("VGGPRICE_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    )
    data_source: str | None = Field(
        None,
        validation_alias=AliasChoices("VGGPRICE_DATA_SOURCE", "FASHION_MNIST_DIR"),
        description="directory with the four Fashion-MNIST IDX files",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "vggprice",
        description="downloaded models, base weights and data files, on this machine",
    )
    debug: bool = Field(False, description="tracebacks on the command line")
    s3_max_attempts: int = Field(
        8, ge=1, description="attempts per S3 request (boto3's standard retry mode)"
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="an MLflow tracking server (http://host:5000); unset: no MLflow. Put "
        "credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, not here",
    )
    worker_name: str | None = Field(
        None, description="names this worker in scoring manifests (default: host and pid)"
    )
    extract_claim_seconds: float = Field(
        90.0,
        gt=0,
        description="a frozen-feature extractor's claim on a shard unchanged this long is "
        "taken over by another (its extractor died)",
    )
    train_memory_mb: float = Field(
        256.0,
        ge=0,
        description="a training's frozen features up to this size are gathered in memory and "
        "batched from there (fastest); larger ones stream from their shards (bounded memory)",
    )
    engines_at_promotion: bool = Field(
        True,
        description="promotion makes the champion's int8 engine and bf16 verdict on this "
        "worker (tasks/governance/engine_gates.py), so its first drop is priced at their speed",
    )


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with non-None flow/CLI parameters on top."""
    settings = Settings()
    given = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update=given) if given else settings
