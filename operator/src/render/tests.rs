//! Render unit tests.
