//! Parley's end-to-end test support.

pub mod controlplane;
pub mod mock_llm;
