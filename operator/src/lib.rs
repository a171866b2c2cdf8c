//! The Parley operator: `render`, the pure function from custom resources to the
//! Kubernetes objects of a Chatbot, and the inputs it reads offline.
//!
//! Controllers (a later part) only fetch inputs, call [`render::render`], apply the result
//! and write status; `parley-operator render` prints what they would apply.

pub mod manifests;
pub mod render;
