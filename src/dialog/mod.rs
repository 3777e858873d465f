//! dialog placeholder
