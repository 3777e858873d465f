//! Tests of configuration loading.
