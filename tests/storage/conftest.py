"""The S3 server fixtures (moto on 127.0.0.1) are those of the integration tests."""

from tests.integrations.conftest import s3_endpoint, s3_env, s3_root

__all__ = ["s3_endpoint", "s3_env", "s3_root"]
