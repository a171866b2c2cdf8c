//! The Parley operator: `render`, the pure function from custom resources to the
//! Kubernetes objects of a Chatbot, the inputs it reads offline, and the controllers.
//!
//! The [`controller`]s only fetch inputs, call [`render::render`], apply the result and
//! write status; `parley-operator render` prints what they would apply.

pub mod controller;
pub mod manifests;
pub mod render;

/// Every CRD as one multi-document YAML stream: what `parley-operator crds` prints and what
/// is committed under `config/crd/` and `charts/parley/crds/`.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in parley_crds::crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
