//! Parley's end-to-end test support.

pub mod mock_llm;
