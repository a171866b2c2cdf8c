//! Reading custom resources and Secrets from YAML files, for `parley-operator render`.
//!
//! This is the offline stand-in for the controllers' API reads: it remembers which file
//! each object came from so problems can name it, and keeps only the names of Secret
//! keys, never their values.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use kube::ResourceExt;
use parley_crds::{Chatbot, ModelRoute, Tenant};
use serde::Deserialize;

use crate::render::SecretKeys;

/// Everything read from the files.
#[derive(Debug, Default)]
pub struct Manifests {
    /// Chatbots, in file order.
    pub chatbots: Vec<Chatbot>,
    /// ModelRoutes.
    pub model_routes: Vec<ModelRoute>,
    /// Tenants.
    pub tenants: Vec<Tenant>,
    /// Secret keys by namespace.
    pub secrets: BTreeMap<String, SecretKeys>,
    /// `Kind/namespace/name` -> the file it came from.
    pub origins: BTreeMap<String, PathBuf>,
    /// Documents that could not be read, each naming the file and document.
    pub errors: Vec<String>,
    /// Documents that were skipped.
    pub warnings: Vec<String>,
}

/// Why files could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A path could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No YAML file was found.
    #[error("no .yaml or .yml file found in {0}")]
    Empty(String),
}

/// The namespace objects without one are read into, as `kubectl apply` would.
pub const DEFAULT_NAMESPACE: &str = "default";

impl Manifests {
    /// Reads every `.yaml`/`.yml` file of the given files and directories (directories
    /// recursively, in name order).
    pub fn load(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let mut files = Vec::new();
        for path in paths {
            collect_files(path, &mut files)?;
        }
        if files.is_empty() {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            return Err(LoadError::Empty(names.join(", ")));
        }
        let mut manifests = Self::default();
        for file in files {
            let text = fs::read_to_string(&file).map_err(|source| LoadError::Io {
                path: file.clone(),
                source,
            })?;
            manifests.add_text(&file, &text);
        }
        Ok(manifests)
    }

    /// Adds the documents of one YAML text read from `file`.
    pub fn add_text(&mut self, file: &Path, text: &str) {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let at = format!("{} (document {})", file.display(), index + 1);
            match serde_yaml::Value::deserialize(document) {
                Ok(serde_yaml::Value::Null) => {}
                Ok(value) => self.add_value(file, &at, value),
                Err(e) => self.errors.push(format!("{at}: not valid YAML: {e}")),
            }
        }
    }

    fn add_value(&mut self, file: &Path, at: &str, value: serde_yaml::Value) {
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        match (api_version.as_str(), kind.as_str()) {
            ("parley.dev/v1alpha1", "Chatbot") => {
                if let Some(o) = self.typed::<Chatbot>(file, at, value) {
                    self.chatbots.push(o);
                }
            }
            ("parley.dev/v1alpha1", "ModelRoute") => {
                if let Some(o) = self.typed::<ModelRoute>(file, at, value) {
                    self.model_routes.push(o);
                }
            }
            ("parley.dev/v1alpha1", "Tenant") => {
                if let Some(o) = self.typed::<Tenant>(file, at, value) {
                    self.tenants.push(o);
                }
            }
            ("v1", "Secret") => self.add_secret(at, &value),
            ("parley.dev/v1alpha1", other) => self.errors.push(format!(
                "{at}: unknown kind {other:?}; expected Chatbot, Tenant or ModelRoute"
            )),
            (version, "") | ("", version) => self.errors.push(format!(
                "{at}: a document needs apiVersion and kind (found apiVersion {version:?})"
            )),
            (version, other) => self.warnings.push(format!(
                "{at}: {version} {other} is not read by render; skipped"
            )),
        }
    }

    fn typed<K>(&mut self, file: &Path, at: &str, value: serde_yaml::Value) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + for<'de> Deserialize<'de>,
    {
        match serde_yaml::from_value::<K>(value) {
            Ok(mut object) => {
                if object.meta().name.as_deref().unwrap_or_default().is_empty() {
                    self.errors
                        .push(format!("{at}: {}: metadata.name is required", K::kind(&())));
                    return None;
                }
                if object.meta().namespace.is_none() {
                    object.meta_mut().namespace = Some(DEFAULT_NAMESPACE.to_string());
                }
                let key = format!(
                    "{}/{}/{}",
                    K::kind(&()),
                    object.namespace().unwrap_or_default(),
                    object.name_any()
                );
                if self
                    .origins
                    .insert(key.clone(), file.to_path_buf())
                    .is_some()
                {
                    self.errors.push(format!("{at}: {key} is defined twice"));
                    return None;
                }
                Some(object)
            }
            Err(e) => {
                self.errors
                    .push(format!("{at}: invalid {}: {e}", K::kind(&())));
                None
            }
        }
    }

    fn add_secret(&mut self, at: &str, value: &serde_yaml::Value) {
        let Some(name) = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
        else {
            self.errors
                .push(format!("{at}: Secret: metadata.name is required"));
            return;
        };
        let namespace = value
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .unwrap_or(DEFAULT_NAMESPACE);
        let keys = self
            .secrets
            .entry(namespace.to_string())
            .or_default()
            .entry(name.to_string())
            .or_default();
        for field in ["data", "stringData"] {
            if let Some(serde_yaml::Value::Mapping(map)) = value.get(field) {
                keys.extend(map.keys().filter_map(|k| k.as_str()).map(str::to_string));
            }
        }
    }

    /// The file an object (`Kind/namespace/name`) came from.
    pub fn origin(&self, object: &str) -> Option<&Path> {
        self.origins.get(object).map(PathBuf::as_path)
    }
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let metadata = fs::metadata(path).map_err(io)?;
    if metadata.is_dir() {
        let mut entries: Vec<PathBuf> = fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            let is_yaml = entry.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if entry.is_dir() || is_yaml {
                collect_files(&entry, files)?;
            }
        }
    } else {
        files.push(path.to_path_buf());
    }
    Ok(())
}
