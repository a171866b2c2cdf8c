//! The Markdown reference of the custom resources and of the GatewayConfig, generated from
//! their schemas so that it cannot drift from the code: `docs/reference/crds.md` and
//! `docs/reference/gateway-config.md`. `make docs` writes them; a test fails when the
//! committed files differ from what this module prints.
//!
//! The schemas are the CRDs' OpenAPI schemas (what the API server validates) and the JSON
//! schema of [`GatewayConfig`](crate::GatewayConfig) (derived with `schemars`); every
//! description is a doc comment in `crds/src`. A default written in brackets at the end of
//! a description (`[2000]`) goes to the Default column.

use std::fmt::Write as _;

use serde_json::Value;

/// Where a Kubernetes type used inside a CRD is documented (it is not expanded here).
const KUBERNETES_TYPES: &[(&str, &str, &str)] = &[
    (
        "spec.modelSelector",
        "LabelSelector",
        "https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/label-selector/",
    ),
    (
        "spec.tenantSelector",
        "LabelSelector",
        "https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/label-selector/",
    ),
    (
        "spec.gateway.resources",
        "ResourceRequirements",
        "https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#resources",
    ),
    (
        "status.conditions",
        "[]Condition",
        "https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/object-meta/#Condition",
    ),
];

/// `docs/reference/crds.md`.
pub fn crds_markdown() -> String {
    let mut out = String::new();
    out.push_str(
        "<!-- Generated from the CRD schemas by `make docs` (crds/src/docs.rs); do not edit.\n     \
         The descriptions are doc comments in crds/src/*.rs: change them there. -->\n\n",
    );
    out.push_str("# Custom resources\n\n");
    out.push_str(
        "Parley's API group is `parley.dev`, version `v1alpha1`. All three kinds are \
         namespaced; a Chatbot serves the ModelRoutes and Tenants of its own namespace that \
         its selectors match. Every kind has a status subresource with `observedGeneration` \
         and standard conditions (`Ready`, with a reason and a message naming the field to \
         fix).\n\n",
    );
    out.push_str(CONVENTIONS);
    let crds: Vec<Value> = crate::crds()
        .into_iter()
        .filter_map(|crd| serde_json::to_value(crd).ok())
        .collect();
    // Chatbot first, then what it selects.
    let order = ["Chatbot", "ModelRoute", "Tenant"];
    out.push_str("Kinds:");
    for kind in order {
        let _ = write!(out, " [{kind}](#{}),", slug(kind));
    }
    out.pop();
    out.push_str(".\n");
    for kind in order {
        let Some(crd) = crds
            .iter()
            .find(|c| c["spec"]["names"]["kind"].as_str() == Some(kind))
        else {
            continue;
        };
        crd_section(&mut out, kind, crd);
    }
    out
}

fn crd_section(out: &mut String, kind: &str, crd: &Value) {
    let names = &crd["spec"]["names"];
    let version = &crd["spec"]["versions"][0];
    let schema = &version["schema"]["openAPIV3Schema"];
    let _ = write!(out, "\n## {kind}\n\n");
    if let Some(d) = schema["description"].as_str() {
        let _ = writeln!(out, "{}\n", one_line(d));
    }
    let short: Vec<&str> = names["shortNames"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "`apiVersion: parley.dev/{}`, `kind: {kind}`; plural `{}`, short name{} {}; \
         `kubectl get {}` shows {}.",
        version["name"].as_str().unwrap_or_default(),
        names["plural"].as_str().unwrap_or_default(),
        if short.len() == 1 { "" } else { "s" },
        short
            .iter()
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", "),
        names["plural"].as_str().unwrap_or_default(),
        version["additionalPrinterColumns"]
            .as_array()
            .map(|cols| cols
                .iter()
                .filter_map(|c| Some(format!(
                    "{} (`{}`)",
                    c["name"].as_str()?,
                    c["jsonPath"].as_str()?
                )))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
    );
    let doc = Doc {
        root: schema,
        prefix: kind.to_string(),
        opaque: KUBERNETES_TYPES,
    };
    for part in ["spec", "status"] {
        let node = &schema["properties"][part];
        if node.is_object() {
            let required = schema["required"]
                .as_array()
                .is_some_and(|r| r.iter().any(|v| v == part));
            doc.object(out, part, node, None, required);
        }
    }
}

/// `docs/reference/gateway-config.md`.
pub fn gateway_config_markdown() -> String {
    let schema =
        serde_json::to_value(schemars::schema_for!(crate::GatewayConfig)).unwrap_or_default();
    let mut out = String::new();
    out.push_str(
        "<!-- Generated from the GatewayConfig schema by `make docs` (crds/src/docs.rs); do not edit.\n     \
         The descriptions are doc comments in crds/src/gateway_config.rs: change them there. -->\n\n",
    );
    out.push_str("# GatewayConfig\n\n");
    out.push_str(
        "The gateway's configuration: one YAML document, `apiVersion: parley.dev/gateway/v1`. \
         The operator renders it from a Chatbot and the ModelRoutes and Tenants it selects \
         into the `config.yaml` key of ConfigMap `<chatbot>-gateway` (every default written \
         out, every secret as a file); `parley-gateway --config FILE` reads it, and \
         `parley-gateway check --config FILE` validates it.\n\n\
         Unknown fields and unknown versions are refused with a message naming the field. \
         Beyond the types below, a config is refused when it is inconsistent: a fallback, \
         default model, `allowedModels`, `modelQuotas` or `upstreamKeys` entry naming no \
         model, a fallback cycle, two models or two tenants with one name, two tenants with \
         one key, a listen address that is not `HOST:PORT`. `check` lists every problem at \
         once. The gateway watches the file (and the secret files it names) and reloads it; \
         a config that is refused leaves the previous one serving.\n\n\
         A complete example: [config/gateway.example.yaml](../../config/gateway.example.yaml).\n\n",
    );
    out.push_str(CONVENTIONS);
    let doc = Doc {
        root: &schema,
        prefix: String::new(),
        opaque: &[],
    };
    doc.object(&mut out, "", &schema, Some("GatewayConfig"), true);
    if let Some(secret) = doc.secret_source() {
        out.push_str("\n### Secret source\n\n");
        if let Some(d) = secret["description"].as_str() {
            let _ = writeln!(out, "{}\n", one_line(d));
        }
        doc.table(&mut out, "", secret);
        out.push_str(
            "\nExamples: `{file: llm-keys/openai}` (rendered configs: key `openai` of Secret \
             `llm-keys`, read from `<secretsDir>/llm-keys/openai`), `{env: OPENAI_API_KEY}`, \
             `{value: sk-local-test}`.\n",
        );
    }
    out
}

const CONVENTIONS: &str = "Reading the tables: **Field** is the YAML key (camelCase); a field \
     whose type links further down is an object or a list of objects with its own table. \
     **Default** is what an absent field means. **Validation** lists what is checked \
     before anything is used (by the API server for the custom resources, at load for the \
     GatewayConfig); *required* fields must be set.\n\n";

/// One schema being documented.
struct Doc<'a> {
    /// The whole schema (where `$ref`s point).
    root: &'a Value,
    /// Heading prefix, e.g. `Chatbot`.
    prefix: String,
    /// Paths of Kubernetes types not expanded: (path, type, link).
    opaque: &'a [(&'a str, &'a str, &'a str)],
}

impl Doc<'_> {
    /// Follows `$ref`, and unwraps `Option`'s `anyOf: [X, null]`.
    fn resolve<'v>(&'v self, node: &'v Value) -> &'v Value {
        let mut node = node;
        for _ in 0..8 {
            if let Some(r) = node["$ref"].as_str() {
                let name = r.rsplit('/').next().unwrap_or_default();
                node = &self.root["$defs"][name];
                continue;
            }
            if let Some(any) = node["anyOf"].as_array()
                && any.len() == 2
                && let Some(other) = any.iter().find(|v| v["type"] != "null")
            {
                node = other;
                continue;
            }
            break;
        }
        node
    }

    fn ref_name(&self, node: &Value) -> Option<String> {
        let direct = node["$ref"].as_str();
        let any = node["anyOf"]
            .as_array()
            .and_then(|a| a.iter().find_map(|v| v["$ref"].as_str()));
        direct
            .or(any)
            .map(|r| r.rsplit('/').next().unwrap_or_default().to_string())
    }

    fn is_secret_source(&self, node: &Value) -> bool {
        self.ref_name(node)
            .is_some_and(|n| n == "SecretSource" || n == "SecretSourceFields")
    }

    fn secret_source(&self) -> Option<&Value> {
        ["SecretSource", "SecretSourceFields"]
            .iter()
            .map(|n| &self.root["$defs"][*n])
            .find(|v| v.is_object())
    }

    fn heading(&self, path: &str) -> String {
        match (self.prefix.is_empty(), path.is_empty()) {
            (true, true) => "GatewayConfig".to_string(),
            (true, false) => path.to_string(),
            (false, _) => format!("{}.{path}", self.prefix),
        }
    }

    /// The section of one object, then the sections of the objects below it.
    fn object(
        &self,
        out: &mut String,
        path: &str,
        node: &Value,
        title: Option<&str>,
        required: bool,
    ) {
        let resolved = self.resolve(node);
        let heading = title.map_or_else(|| self.heading(path), str::to_string);
        let _ = write!(out, "\n### {heading}\n\n");
        let description = node["description"]
            .as_str()
            .or(resolved["description"].as_str());
        if let Some(d) = description {
            let (text, default) = split_default(d);
            let _ = write!(out, "{}", one_line(&text));
            if let Some(default) = default {
                let _ = write!(out, " Default: {default}.");
            }
            out.push_str("\n\n");
        }
        if required && !path.is_empty() && path != "spec" {
            out.push_str("Required.\n\n");
        }
        self.rules(out, resolved);
        self.table(out, path, resolved);
        let props = resolved["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let required_fields = required_set(resolved);
        for (name, child) in &props {
            let child_path = join(path, name);
            if self.opaque_type(&child_path).is_some() || self.is_secret_source(child) {
                continue;
            }
            let inner = self.resolve(child);
            if has_properties(inner) {
                self.object(
                    out,
                    &child_path,
                    child,
                    None,
                    required_fields.contains(name),
                );
            } else if inner["type"] == "array" {
                let items = &inner["items"];
                if has_properties(self.resolve(items)) && !self.is_secret_source(items) {
                    let mut item = self.resolve(items).clone();
                    if let (Some(obj), Some(d)) =
                        (item.as_object_mut(), child["description"].as_str())
                    {
                        obj.insert("description".into(), Value::String(d.to_string()));
                    }
                    self.object(out, &format!("{child_path}[]"), &item, None, false);
                }
            }
        }
    }

    /// CEL rules (`x-kubernetes-validations`) of an object.
    fn rules(&self, out: &mut String, node: &Value) {
        let Some(rules) = node["x-kubernetes-validations"].as_array() else {
            return;
        };
        out.push_str("Rules checked by the API server:\n\n");
        for rule in rules {
            let _ = writeln!(
                out,
                "- {} (`{}`)",
                rule["message"].as_str().unwrap_or_default(),
                rule["rule"].as_str().unwrap_or_default()
            );
        }
        out.push('\n');
    }

    fn table(&self, out: &mut String, path: &str, node: &Value) {
        let Some(props) = node["properties"].as_object() else {
            return;
        };
        let required = required_set(node);
        out.push_str("| Field | Type | Default | Validation | Description |\n");
        out.push_str("|---|---|---|---|---|\n");
        for (name, child) in props {
            let child_path = join(path, name);
            let (ty, _) = self.type_of(&child_path, child);
            let description = child["description"]
                .as_str()
                .or(self.resolve(child)["description"].as_str())
                .unwrap_or_default();
            let (text, bracket_default) = split_default(description);
            // A bracketed default says more than the schema's `null`.
            let default = match (child.get("default"), bracket_default) {
                (Some(Value::Null) | None, Some(said)) => said,
                (Some(v), _) => format_default(v),
                (None, None) => String::new(),
            };
            let mut checks = validation(self.resolve(child));
            if required.contains(name) {
                checks.insert(0, "*required*".to_string());
            }
            let text = match enum_docs(self.resolve(child), &text) {
                Some(values) => format!("{} {values}", one_line(&text)),
                None => one_line(&text),
            };
            let _ = writeln!(
                out,
                "| `{name}` | {} | {} | {} | {} |",
                cell(&ty),
                cell(&default),
                cell(&checks.join("; ")),
                cell(&text)
            );
        }
    }

    fn opaque_type(&self, path: &str) -> Option<(&str, &str)> {
        self.opaque
            .iter()
            .find(|(p, _, _)| *p == path)
            .map(|(_, t, l)| (*t, *l))
    }

    /// The type column, and whether it links to a section.
    fn type_of(&self, path: &str, node: &Value) -> (String, bool) {
        if let Some((ty, link)) = self.opaque_type(path) {
            return (format!("[{ty}]({link})"), true);
        }
        if self.is_secret_source(node) {
            return ("[secret source](#secret-source)".to_string(), true);
        }
        let node = self.resolve(node);
        if node["x-kubernetes-int-or-string"] == true {
            return ("integer or string".to_string(), false);
        }
        if has_properties(node) {
            return (format!("[object](#{})", slug(&self.heading(path))), true);
        }
        match type_name(node).as_str() {
            "array" => {
                let items = &node["items"];
                if self.is_secret_source(items) {
                    return ("[][secret source](#secret-source)".to_string(), true);
                }
                let inner = self.resolve(items);
                if has_properties(inner) {
                    let target = slug(&self.heading(&format!("{path}[]")));
                    (format!("[[]object](#{target})"), true)
                } else {
                    (format!("[]{}", type_name(inner)), false)
                }
            }
            "object" => match node["additionalProperties"].as_object() {
                Some(v) => (
                    format!("map[string]{}", type_name(&Value::Object(v.clone()))),
                    false,
                ),
                None => ("object".to_string(), false),
            },
            other => (other.to_string(), false),
        }
    }
}

fn has_properties(node: &Value) -> bool {
    node["properties"]
        .as_object()
        .is_some_and(|p| !p.is_empty())
}

fn required_set(node: &Value) -> Vec<String> {
    node["required"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn type_name(node: &Value) -> String {
    if node["oneOf"]
        .as_array()
        .is_some_and(|a| a.iter().all(|v| v.get("const").is_some()))
    {
        return "string".to_string();
    }
    match &node["type"] {
        Value::String(t) => t.clone(),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("any")
            .to_string(),
        _ => "any".to_string(),
    }
}

/// Bounds, lengths, patterns and enums of a field.
fn validation(node: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let unsigned = node["format"]
        .as_str()
        .is_some_and(|f| f.starts_with("uint"));
    let num = |v: &Value| {
        v.as_f64().map(|f| {
            if f.fract() == 0.0 {
                format!("{}", f as i64)
            } else {
                f.to_string()
            }
        })
    };
    let min = num(&node["minimum"]);
    let max = num(&node["maximum"]);
    match (min, max) {
        (Some(a), Some(b)) => out.push(format!("{a} to {b}")),
        (Some(a), None) if !(unsigned && a == "0") => out.push(format!(">= {a}")),
        (None, Some(b)) => out.push(format!("<= {b}")),
        _ => {}
    }
    for (lo, hi, what) in [
        ("minLength", "maxLength", "length"),
        ("minItems", "maxItems", "items"),
    ] {
        match (node[lo].as_u64(), node[hi].as_u64()) {
            (Some(a), Some(b)) => out.push(format!("{what} {a} to {b}")),
            (Some(a), None) => out.push(format!("{what} >= {a}")),
            (None, Some(b)) => out.push(format!("{what} <= {b}")),
            _ => {}
        }
    }
    if let Some(p) = node["pattern"].as_str() {
        out.push(format!("pattern `{p}`"));
    }
    if let Some(values) = node["enum"].as_array() {
        out.push(format!(
            "one of {}",
            values
                .iter()
                .filter_map(Value::as_str)
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(values) = node["oneOf"].as_array()
        && values.iter().all(|v| v.get("const").is_some())
    {
        out.push(format!(
            "one of {}",
            values
                .iter()
                .filter_map(|v| v["const"].as_str())
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    match (
        node["x-kubernetes-list-type"].as_str(),
        node["x-kubernetes-list-map-keys"].as_array(),
    ) {
        (Some("set"), _) => out.push("no duplicates".to_string()),
        (Some("map"), Some(keys)) => out.push(format!(
            "unique {}",
            keys.iter()
                .filter_map(Value::as_str)
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(" + ")
        )),
        _ => {}
    }
    if let Some(items) = node["items"].as_object() {
        let inner = validation(&Value::Object(items.clone()));
        if !inner.is_empty() {
            out.push(format!("each: {}", inner.join(", ")));
        }
    }
    out
}

/// The meaning of each value of an enum whose values are documented, unless the field's
/// description already names every value.
fn enum_docs(node: &Value, description: &str) -> Option<String> {
    let values = node["oneOf"].as_array()?;
    let named = values.iter().all(|v| {
        v["const"]
            .as_str()
            .is_some_and(|c| description.contains(&format!("`{c}`")))
    });
    if named {
        return None;
    }
    let docs: Vec<String> = values
        .iter()
        .filter_map(|v| {
            Some(format!(
                "`{}`: {}",
                v["const"].as_str()?,
                one_line(v["description"].as_str()?)
            ))
        })
        .collect();
    (!docs.is_empty()).then(|| docs.join(" "))
}

fn format_default(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::String(s) => format!("`{s}`"),
        Value::Array(a) if a.is_empty() => "`[]`".to_string(),
        Value::Object(o) if o.values().all(|v| !v.is_object()) => format!(
            "`{{{}}}`",
            o.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => format!("`{other}`"),
    }
}

/// Splits a trailing bracketed default (`... [2000].`) off a description.
fn split_default(description: &str) -> (String, Option<String>) {
    let text = description.trim();
    let Some(open) = text.rfind('[') else {
        return (text.to_string(), None);
    };
    let Some(close) = text[open..].find(']').map(|i| open + i) else {
        return (text.to_string(), None);
    };
    // Not a Markdown link, and the default is the last thing said in its sentence.
    if text[close + 1..].starts_with('(') {
        return (text.to_string(), None);
    }
    let default = one_line(&text[open + 1..close]);
    let before = text[..open].trim_end();
    let after = &text[close + 1..];
    let joined = format!("{before}{after}");
    (joined, Some(default))
}

/// Collapses a multi-line description into one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A table cell: pipes escaped.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// GitHub's heading anchor.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' => Some(c),
            ' ' => Some('-'),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn defaults_in_brackets_are_split_off() {
        assert_eq!(
            split_default("TCP and TLS connect timeout [2000]."),
            (
                "TCP and TLS connect timeout.".to_string(),
                Some("2000".into())
            )
        );
        assert_eq!(
            split_default("Fixed replica count [1]; ignored when autoscaling is set."),
            (
                "Fixed replica count; ignored when autoscaling is set.".to_string(),
                Some("1".into())
            )
        );
        assert_eq!(split_default("No default.").1, None);
        assert_eq!(split_default("A [link](https://x).").1, None);
    }

    #[test]
    fn slugs_are_githubs() {
        assert_eq!(slug("Chatbot.spec.gateway"), "chatbotspecgateway");
        assert_eq!(slug("models[].backends[]"), "modelsbackends");
        assert_eq!(slug("Secret source"), "secret-source");
    }

    #[test]
    fn every_crd_field_is_documented() {
        let md = crds_markdown();
        for needle in [
            "### Chatbot.spec.gateway.autoscaling",
            "| `minReplicas` |",
            "### ModelRoute.spec.backends[]",
            "### Tenant.spec.upstreamKeys[]",
            "| `targetCPUUtilizationPercentage` | integer | 70 | 1 to 100 |",
            "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
        ] {
            assert!(md.contains(needle), "{needle} missing from:\n{md}");
        }
    }

    #[test]
    fn every_gateway_config_field_is_documented() {
        let md = gateway_config_markdown();
        for needle in [
            "### models[].backends[].timeouts",
            "| `connectMs` | integer | `2000` |",
            "| `listen` | string | `0.0.0.0:8080` |",
            "### Secret source",
            "| `apiKey` | [secret source](#secret-source) |",
            "| `rateLimitFailureMode` | string | `open` | one of `open`, `closed` |",
        ] {
            assert!(md.contains(needle), "{needle} missing from:\n{md}");
        }
    }
}
