//! The samples under `config/samples/` render, and what they render keeps its promises:
//! a loadable GatewayConfig, no secret values, every secret mounted where the config
//! says, and committed CRDs that match the code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use parley_crds::GatewayConfig;
use parley_crds::gateway_config::SecretSource;
use parley_operator::manifests::Manifests;
use parley_operator::render::{self, RenderInput, Rendered};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn render_samples() -> (Manifests, Rendered) {
    let manifests = Manifests::load(&[repo().join("config/samples")]).unwrap();
    assert!(manifests.errors.is_empty(), "{:?}", manifests.errors);
    assert_eq!(manifests.chatbots.len(), 1);
    let rendered = render::render(&RenderInput {
        chatbot: &manifests.chatbots[0],
        model_routes: &manifests.model_routes,
        tenants: &manifests.tenants,
        secrets: &manifests.secrets["default"],
        default_image: "ghcr.io/parley-dev/parley-gateway:test",
    })
    .unwrap();
    (manifests, rendered)
}

fn gateway_config(rendered: &Rendered) -> (String, GatewayConfig) {
    let text = rendered.config_map.data.as_ref().unwrap()["config.yaml"].clone();
    let config = GatewayConfig::from_yaml(&text).unwrap();
    (text, config)
}

#[test]
fn samples_render_snapshot() {
    let (_, rendered) = render_samples();
    assert!(rendered.warnings.is_empty(), "{:?}", rendered.warnings);
    insta::assert_snapshot!("samples", rendered.to_yaml().unwrap());
}

#[test]
fn gateway_config_loads_and_round_trips() {
    let (text, config) = gateway_config(&render_samples().1);
    assert_eq!(
        config.to_yaml().unwrap(),
        text,
        "render writes exactly what the loader would"
    );
    assert_eq!(config.models.len(), 3);
    assert_eq!(config.tenants.len(), 2);
    assert_eq!(config.default_model, "gpt-4o");
}

#[test]
fn no_secret_value_appears_in_the_output() {
    let text = std::fs::read_to_string(repo().join("config/samples/00-secrets.yaml")).unwrap();
    let mut values = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
        if let Some(serde_yaml::Value::Mapping(data)) = value.get("stringData") {
            values.extend(data.values().map(|v| v.as_str().unwrap().to_string()));
        }
    }
    assert!(values.len() >= 5);
    let output = render_samples().1.to_yaml().unwrap();
    for value in values {
        assert!(
            !output.contains(&value),
            "secret value {value:?} leaked into the rendered output"
        );
    }
}

#[test]
fn every_secret_file_of_the_config_is_mounted_by_one_projected_volume() {
    let (_, rendered) = render_samples();
    let (_, config) = gateway_config(&rendered);
    let secrets_dir = config.secrets_dir.clone().unwrap();
    let mut named: BTreeSet<PathBuf> = BTreeSet::new();
    let mut add = |s: &SecretSource| match s {
        SecretSource::File(path) => {
            named.insert(secrets_dir.join(path));
        }
        other => panic!("rendered configs use files only, found {other:?}"),
    };
    for model in &config.models {
        model
            .backends
            .iter()
            .filter_map(|b| b.api_key.as_ref())
            .for_each(&mut add);
    }
    for tenant in &config.tenants {
        tenant.api_keys.iter().for_each(&mut add);
        tenant
            .upstream_keys
            .iter()
            .map(|k| &k.api_key)
            .for_each(&mut add);
    }
    config.redis.iter().for_each(|r| add(&r.url));
    config.usage.iter().for_each(|u| add(&u.postgres_url));

    let pod = rendered.deployment.spec.unwrap().template.spec.unwrap();
    let projected: Vec<_> = pod
        .volumes
        .unwrap()
        .into_iter()
        .filter(|v| v.projected.is_some())
        .collect();
    assert_eq!(projected.len(), 1, "exactly one projected volume");
    let volume = &projected[0];
    let container = &pod.containers[0];
    let mount = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == volume.name)
        .expect("the projected volume is mounted");
    assert_eq!(Path::new(&mount.mount_path), secrets_dir);
    let mut mounted = BTreeSet::new();
    for source in volume.projected.as_ref().unwrap().sources.as_ref().unwrap() {
        let secret = source.secret.as_ref().expect("only Secrets are projected");
        for item in secret.items.as_ref().unwrap() {
            assert_eq!(item.path, format!("{}/{}", secret.name, item.key));
            mounted.insert(secrets_dir.join(&item.path));
        }
    }
    assert_eq!(mounted, named);
    assert!(mounted.contains(&secrets_dir.join("globex-api-key/api-key")));
}

#[test]
fn committed_crds_match_the_code() {
    let generated = parley_operator::crds_yaml().unwrap();
    for path in [
        "config/crd/parley-crds.yaml",
        "charts/parley/crds/parley-crds.yaml",
    ] {
        let committed = std::fs::read_to_string(repo().join(path)).unwrap_or_default();
        assert!(
            committed == generated,
            "{path} is out of date with the code: run `make crds` and commit the result"
        );
    }
}

#[test]
fn render_command_reports_every_problem_with_file_object_and_field() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo().join("config/samples")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let routes = dir.path().join("10-modelroutes.yaml");
    let text = std::fs::read_to_string(&routes).unwrap();
    // A cycle, and a fallback naming no model.
    let text = text.replacen(
        "fallbacks: [claude-sonnet]",
        "fallbacks: [gpt-4o, no-such-model]",
        1,
    );
    std::fs::write(&routes, text).unwrap();
    let chatbot = dir.path().join("30-chatbot.yaml");
    let text = std::fs::read_to_string(&chatbot)
        .unwrap()
        .replace("defaultModel: gpt-4o", "defaultModel: gpt-5");
    std::fs::write(&chatbot, text).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_parley-operator"))
        .args(["render", "-f"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    for needle in [
        "10-modelroutes.yaml: error: ModelRoute/default/gpt-4o-mini: spec.fallbacks[1]: \"no-such-model\"",
        "fallbacks form a cycle: gpt-4o -> gpt-4o-mini -> gpt-4o",
        "30-chatbot.yaml: error: Chatbot/default/support: spec.defaultModel: \"gpt-5\"",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn render_command_prints_the_samples() {
    let output = Command::new(env!("CARGO_BIN_EXE_parley-operator"))
        .args(["render", "-f"])
        .arg(repo().join("config/samples"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        stdout.matches("\n---\n").count() + usize::from(stdout.starts_with("---")),
        6
    );
}

#[test]
fn render_command_names_kong_credentials_and_never_prints_a_value() {
    let example = repo().join("config/examples/kong-chatbot.yaml");
    let output = Command::new(env!("CARGO_BIN_EXE_parley-operator"))
        .args(["render", "-f"])
        .arg(&example)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains(
            "# Objects carrying secret values are not printed: Secret/default/hooli-kong-key, Secret/default/initech-kong-key"
        ),
        "{stdout}"
    );
    let kinds: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ConfigMap",
            "Deployment",
            "Service",
            "Ingress",
            "KongPlugin",
            "KongPlugin",
            "KongConsumer",
            "KongConsumer"
        ]
    );
    // The example's Secret values (stringData) never reach the output.
    let text = std::fs::read_to_string(&example).unwrap();
    let values: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("key: ")
                .or(l.trim().strip_prefix("api-key: "))
        })
        .collect();
    assert_eq!(values.len(), 2, "{values:?}");
    for value in values {
        assert!(!stdout.contains(value), "{value} printed");
    }
    assert!(!stdout.contains("kind: Secret"));
}
