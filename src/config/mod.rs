//! Configuration: TOML + environment, validated into typed values.
