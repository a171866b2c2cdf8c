//! Unit tests of `render`: each problem it reports, and the shape of what it renders.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use parley_crds::{Chatbot, ModelRoute, Tenant};

use super::*;

fn parse<T: for<'de> serde::Deserialize<'de>>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).unwrap()
}

fn route(name: &str, fallbacks: &[&str]) -> ModelRoute {
    parse(&format!(
        r#"
apiVersion: parley.dev/v1alpha1
kind: ModelRoute
metadata: {{name: {name}, namespace: ns}}
spec:
  backends:
  - {{name: primary, provider: openai, baseUrl: "http://upstream/v1", apiKeySecretRef: {{name: llm, key: k}}}}
  fallbacks: {fallbacks:?}
"#
    ))
}

fn tenant(name: &str, extra: &str) -> Tenant {
    parse(&format!(
        "apiVersion: parley.dev/v1alpha1\nkind: Tenant\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{{extra}}}\n"
    ))
}

fn chatbot(name: &str, extra: &str) -> Chatbot {
    parse(&format!(
        "apiVersion: parley.dev/v1alpha1\nkind: Chatbot\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  defaultModel: a\n{extra}"
    ))
}

fn secrets() -> SecretKeys {
    BTreeMap::from([
        ("llm".to_string(), BTreeSet::from(["k".to_string()])),
        ("redis".to_string(), BTreeSet::from(["url".to_string()])),
    ])
}

fn run(cb: &Chatbot, routes: &[ModelRoute], tenants: &[Tenant]) -> Result<Rendered, RenderError> {
    let secrets = secrets();
    render(&RenderInput {
        chatbot: cb,
        model_routes: routes,
        tenants,
        secrets: &secrets,
        default_image: "img:1",
    })
}

fn errors(result: Result<Rendered, RenderError>) -> Vec<Problem> {
    let err = result.expect_err("render should have failed");
    err.problems
        .into_iter()
        .filter(|p| p.severity == Severity::Error)
        .collect()
}

fn assert_one_error(problems: &[Problem], object: &str, field: &str, needle: &str) {
    assert!(
        problems
            .iter()
            .any(|p| p.object == object && p.field == field && p.message.contains(needle)),
        "no error on {object} {field} containing {needle:?} in {problems:#?}"
    );
}

#[test]
fn renders_a_minimal_chatbot() {
    let rendered = run(&chatbot("bot", ""), &[route("a", &[])], &[tenant("t", "")]).unwrap();
    assert_eq!(rendered.models, vec!["a"]);
    assert_eq!(rendered.tenants, vec!["ns/t"]);
    assert!(rendered.autoscaler.is_none());
    assert!(rendered.disruption_budget.is_none(), "one replica: no PDB");
    let deployment = rendered.deployment.spec.unwrap();
    assert_eq!(deployment.replicas, Some(1));
    let pod = deployment.template.spec.unwrap();
    assert_eq!(pod.containers[0].image.as_deref(), Some("img:1"));
}

#[test]
fn fallback_cycle_is_an_error() {
    let routes = [route("a", &["b"]), route("b", &["c"]), route("c", &["a"])];
    let problems = errors(run(&chatbot("bot", ""), &routes, &[tenant("t", "")]));
    assert_one_error(
        &problems,
        "ModelRoute/ns/a",
        "spec.fallbacks",
        "a -> b -> c -> a",
    );
}

#[test]
fn responses_api_is_rendered_and_checked() {
    let mut passthrough = route("a", &[]);
    passthrough.spec.backends[0].responses_api = Some(true);
    let rendered = run(&chatbot("bot", ""), &[passthrough.clone()], &[]).unwrap();
    let text = &rendered.config_map.data.as_ref().unwrap()["config.yaml"];
    let config = parley_crds::GatewayConfig::from_yaml(text).unwrap();
    assert!(config.models[0].backends[0].responses_api, "{text}");
    let plain = run(&chatbot("bot", ""), &[route("a", &[])], &[]).unwrap();
    let text = &plain.config_map.data.as_ref().unwrap()["config.yaml"];
    assert!(!text.contains("responsesApi"), "{text}");

    let mut bad = passthrough;
    bad.spec.backends[0].provider = parley_crds::model_route::Provider::Anthropic;
    let problems = errors(run(&chatbot("bot", ""), &[bad], &[]));
    assert_one_error(
        &problems,
        "ModelRoute/ns/a",
        "spec.backends[0].responsesApi",
        "responsesApi needs provider openai",
    );
}

#[test]
fn h2c_is_rendered_and_checked() {
    let mut h2c = route("a", &[]);
    h2c.spec.backends[0].h2c = Some(true);
    let rendered = run(&chatbot("bot", ""), &[h2c.clone()], &[]).unwrap();
    let text = &rendered.config_map.data.as_ref().unwrap()["config.yaml"];
    let config = parley_crds::GatewayConfig::from_yaml(text).unwrap();
    assert!(config.models[0].backends[0].h2c, "{text}");

    let mut bad = h2c;
    bad.spec.backends[0].base_url = "https://upstream/v1".into();
    let problems = errors(run(&chatbot("bot", ""), &[bad], &[]));
    assert_one_error(
        &problems,
        "ModelRoute/ns/a",
        "spec.backends[0].h2c",
        "h2c is HTTP/2 without TLS and needs an http:// baseUrl",
    );
}

#[test]
fn embeddings_kind_is_rendered_and_checked() {
    let mut embed = route("e", &[]);
    embed.spec.kind = Some(parley_crds::model_route::ModelKind::Embeddings);
    let rendered = run(&chatbot("bot", ""), &[route("a", &[]), embed.clone()], &[]).unwrap();
    let text = &rendered.config_map.data.as_ref().unwrap()["config.yaml"];
    let config = parley_crds::GatewayConfig::from_yaml(text).unwrap();
    let kinds: Vec<&str> = config.models.iter().map(|m| m.kind.as_str()).collect();
    assert_eq!(kinds, ["chat", "embeddings"]);
    assert!(
        text.contains("kind: embeddings") && text.contains("kind: chat"),
        "{text}"
    );

    // An anthropic backend, a fallback of the other kind, and an embeddings default.
    let mut bad = embed.clone();
    bad.spec.backends[0].provider = parley_crds::model_route::Provider::Anthropic;
    bad.spec.fallbacks = vec!["a".into()];
    let mut cb = chatbot("bot", "");
    cb.spec.default_model = "e".into();
    let problems = errors(run(&cb, &[route("a", &["e"]), bad], &[]));
    assert_one_error(
        &problems,
        "ModelRoute/ns/e",
        "spec.backends[0].provider",
        "Anthropic has no embeddings API",
    );
    assert_one_error(
        &problems,
        "ModelRoute/ns/e",
        "spec.fallbacks[0]",
        "\"a\" is a chat model and cannot stand in for this embeddings model",
    );
    assert_one_error(
        &problems,
        "ModelRoute/ns/a",
        "spec.fallbacks[0]",
        "\"e\" is an embeddings model and cannot stand in for this chat model",
    );
    assert_one_error(
        &problems,
        "Chatbot/ns/bot",
        "spec.defaultModel",
        "\"e\" is an embeddings model",
    );
}

#[test]
fn fallback_to_unselected_model_is_an_error() {
    let problems = errors(run(
        &chatbot("bot", ""),
        &[route("a", &["x", "missing"])],
        &[tenant("t", "")],
    ));
    assert_one_error(
        &problems,
        "ModelRoute/ns/a",
        "spec.fallbacks[0]",
        "\"x\" is not a model selected",
    );
    assert_one_error(
        &problems,
        "ModelRoute/ns/a",
        "spec.fallbacks[1]",
        "\"missing\"",
    );
}

#[test]
fn default_model_must_be_selected() {
    let problems = errors(run(
        &chatbot("bot", ""),
        &[route("b", &[])],
        &[tenant("t", "")],
    ));
    assert_one_error(
        &problems,
        "Chatbot/ns/bot",
        "spec.defaultModel",
        "\"a\" is not a selected model",
    );
}

#[test]
fn two_routes_for_one_model_is_an_error() {
    let mut second = route("a-copy", &[]);
    second.spec.model = Some("a".into());
    let problems = errors(run(
        &chatbot("bot", ""),
        &[route("a", &[]), second],
        &[tenant("t", "")],
    ));
    assert_one_error(
        &problems,
        "ModelRoute/ns/a-copy",
        "spec.model",
        "already served by ModelRoute a",
    );
}

#[test]
fn model_selector_matching_nothing_is_an_error() {
    let cb = chatbot("bot", "  modelSelector: {matchLabels: {team: nobody}}\n");
    let problems = errors(run(&cb, &[route("a", &[])], &[tenant("t", "")]));
    assert_one_error(
        &problems,
        "Chatbot/ns/bot",
        "spec.modelSelector",
        "selects no ModelRoute",
    );
}

#[test]
fn routes_of_other_namespaces_are_not_selected() {
    let mut other = route("a", &[]);
    other.metadata.namespace = Some("elsewhere".into());
    let problems = errors(run(&chatbot("bot", ""), &[other], &[tenant("t", "")]));
    assert_one_error(
        &problems,
        "Chatbot/ns/bot",
        "spec.modelSelector",
        "selects no ModelRoute",
    );
}

#[test]
fn several_replicas_need_redis() {
    for extra in [
        "  gateway: {replicas: 3}\n",
        "  gateway: {autoscaling: {minReplicas: 1, maxReplicas: 4}}\n",
    ] {
        let problems = errors(run(
            &chatbot("bot", extra),
            &[route("a", &[])],
            &[tenant("t", "")],
        ));
        assert_one_error(&problems, "Chatbot/ns/bot", "spec.redis", "no Redis is set");
    }
    let cb = chatbot(
        "bot",
        "  gateway: {replicas: 3}\n  redis: {urlSecretRef: {name: redis, key: url}}\n",
    );
    let rendered = run(&cb, &[route("a", &[])], &[tenant("t", "")]).unwrap();
    assert!(rendered.disruption_budget.is_some());
}

#[test]
fn missing_secret_and_missing_key_are_errors() {
    let mut r = route("a", &[]);
    r.spec.backends[0].api_key_secret_ref = Some(parley_crds::common::SecretKeyRef {
        name: "llm".into(),
        key: "nope".into(),
    });
    let t = tenant("t", "apiKeys: [{secretRef: {name: gone, key: api-key}}]");
    let problems = errors(run(&chatbot("bot", ""), &[r], &[t]));
    assert_one_error(
        &problems,
        "ModelRoute/ns/a",
        "spec.backends[0].apiKeySecretRef",
        "has no key \"nope\"",
    );
    assert_one_error(
        &problems,
        "Tenant/ns/t",
        "spec.apiKeys[0].secretRef",
        "Secret \"gone\" does not exist",
    );
}

#[test]
fn generated_tenant_key_may_be_missing_and_is_mounted_optional() {
    let rendered = run(&chatbot("bot", ""), &[route("a", &[])], &[tenant("t", "")]).unwrap();
    let pod = rendered.deployment.spec.unwrap().template.spec.unwrap();
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "secrets")
        .unwrap();
    let sources = volume.projected.unwrap().sources.unwrap();
    let generated = sources
        .iter()
        .filter_map(|s| s.secret.as_ref())
        .find(|s| s.name == "t-api-key")
        .unwrap();
    assert_eq!(generated.optional, Some(true));
    let llm = sources
        .iter()
        .filter_map(|s| s.secret.as_ref())
        .find(|s| s.name == "llm")
        .unwrap();
    assert_eq!(llm.optional, None);
}

#[test]
fn tenant_selector_matching_nothing_is_a_warning() {
    let cb = chatbot("bot", "  tenantSelector: {matchLabels: {team: nobody}}\n");
    let rendered = run(&cb, &[route("a", &[])], &[tenant("t", "")]).unwrap();
    assert!(rendered.tenants.is_empty());
    assert!(
        rendered
            .warnings
            .iter()
            .any(|w| w.severity == Severity::Warning && w.field == "spec.tenantSelector"),
        "{:?}",
        rendered.warnings
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let cb = chatbot("bot", "  gateway: {replicas: 2}\n");
    let problems = errors(run(&cb, &[route("b", &["zzz"])], &[tenant("t", "")]));
    assert!(problems.len() >= 3, "{problems:#?}");
}

#[test]
fn long_chatbot_names_give_valid_child_names() {
    let name = "c".repeat(63);
    let rendered = run(&chatbot(&name, ""), &[route("a", &[])], &[tenant("t", "")]).unwrap();
    for object in rendered.objects().unwrap() {
        let meta = &object["metadata"];
        let child = meta["name"].as_str().unwrap();
        assert!(child.len() <= 63, "{child}");
        for value in meta["labels"].as_object().unwrap().values() {
            assert!(value.as_str().unwrap().len() <= 63, "{value}");
        }
    }
    assert_eq!(
        rendered.deployment.metadata.name,
        rendered.service.metadata.name
    );
}

#[test]
fn render_is_deterministic() {
    let routes = [route("b", &[]), route("a", &["b"])];
    let tenants = [tenant("z", ""), tenant("y", "")];
    let first = run(&chatbot("bot", ""), &routes, &tenants)
        .unwrap()
        .to_yaml()
        .unwrap();
    let reversed_routes = [route("a", &["b"]), route("b", &[])];
    let reversed_tenants = [tenant("y", ""), tenant("z", "")];
    let second = run(&chatbot("bot", ""), &reversed_routes, &reversed_tenants)
        .unwrap()
        .to_yaml()
        .unwrap();
    assert_eq!(first, second, "input order must not change the output");
}

#[test]
fn autoscaling_leaves_replicas_to_the_hpa() {
    let cb = chatbot(
        "bot",
        "  gateway: {autoscaling: {minReplicas: 2, maxReplicas: 5}}\n  redis: {urlSecretRef: {name: redis, key: url}}\n",
    );
    let rendered = run(&cb, &[route("a", &[])], &[tenant("t", "")]).unwrap();
    assert_eq!(rendered.deployment.spec.as_ref().unwrap().replicas, None);
    let hpa = rendered.autoscaler.unwrap().spec.unwrap();
    assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 5));
}

#[test]
fn termination_grace_outlasts_the_longest_call() {
    let mut r = route("a", &[]);
    r.spec.backends[0].timeouts = Some(parley_crds::model_route::Timeouts {
        total_ms: Some(600_000),
        ..Default::default()
    });
    let rendered = run(&chatbot("bot", ""), &[r], &[tenant("t", "")]).unwrap();
    let pod = rendered.deployment.spec.unwrap().template.spec.unwrap();
    assert!(pod.termination_grace_period_seconds.unwrap() > 600);
}

#[test]
fn an_oversized_config_is_refused() {
    let mut cb = chatbot("bot", "");
    cb.spec.system_prompt = Some("x".repeat(MAX_CONFIG_BYTES + 1));
    let problems = errors(run(&cb, &[route("a", &[])], &[tenant("t", "")]));
    assert_one_error(&problems, "Chatbot/ns/bot", "spec", "ConfigTooLarge");
}

// --- Kong (spec.kong) ---

fn kong_bot(name: &str, kong: &str) -> Chatbot {
    chatbot(name, &format!("  kong:\n{kong}"))
}

fn plugin<'a>(rendered: &'a Rendered, name: &str) -> &'a KongPlugin {
    rendered
        .kong_plugins
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no KongPlugin {name} in {:?}", rendered.kong_plugins))
}

#[test]
fn without_kong_nothing_kong_is_rendered() {
    let rendered = run(&chatbot("bot", ""), &[route("a", &[])], &[tenant("t", "")]).unwrap();
    assert!(rendered.ingress.is_none());
    assert!(rendered.kong_plugins.is_empty());
    assert!(rendered.kong_consumers.is_empty());
    assert!(rendered.kong_credentials.is_empty());
    assert!(!rendered.to_yaml().unwrap().contains("konghq"));
}

#[test]
fn kong_ingress_points_at_the_service_with_the_plugins() {
    let cb = kong_bot(
        "bot",
        "    host: chat.example.com\n    tlsSecretName: chat-tls\n    rateLimit: {minute: 60}\n    keyAuth: true\n",
    );
    let rendered = run(&cb, &[route("a", &[])], &[tenant("t", "")]).unwrap();
    let ingress = rendered.ingress.clone().unwrap();
    assert_eq!(ingress.metadata.name.as_deref(), Some("bot-gateway"));
    assert_eq!(
        ingress.metadata.annotations.unwrap()["konghq.com/plugins"],
        "bot-rate-limiting,bot-key-auth"
    );
    assert_eq!(
        ingress.metadata.labels.unwrap()["app.kubernetes.io/managed-by"],
        MANAGER
    );
    let spec = ingress.spec.unwrap();
    assert_eq!(spec.ingress_class_name.as_deref(), Some("kong"));
    let tls = &spec.tls.unwrap()[0];
    assert_eq!(tls.secret_name.as_deref(), Some("chat-tls"));
    assert_eq!(
        tls.hosts.as_deref(),
        Some(&["chat.example.com".to_string()][..])
    );
    let rule = &spec.rules.unwrap()[0];
    assert_eq!(rule.host.as_deref(), Some("chat.example.com"));
    let backend = rule.http.as_ref().unwrap().paths[0]
        .backend
        .service
        .clone()
        .unwrap();
    assert_eq!(backend.name, "bot-gateway");
    assert_eq!(backend.port.unwrap().number, Some(80));
    // Stable order: workload, then Ingress, plugins, consumers.
    let kinds: Vec<String> = rendered
        .objects()
        .unwrap()
        .iter()
        .map(|o| o["kind"].as_str().unwrap().to_string())
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
            "KongConsumer"
        ]
    );
}

#[test]
fn kong_without_plugins_has_no_plugins_annotation() {
    let cb = kong_bot(
        "bot",
        "    host: chat.example.com\n    ingressClassName: edge\n",
    );
    let rendered = run(&cb, &[route("a", &[])], &[tenant("t", "")]).unwrap();
    let ingress = rendered.ingress.unwrap();
    assert!(ingress.metadata.annotations.is_none());
    let spec = ingress.spec.unwrap();
    assert_eq!(spec.ingress_class_name.as_deref(), Some("edge"));
    assert!(spec.tls.is_none());
    assert!(rendered.kong_plugins.is_empty());
    assert!(
        rendered.kong_consumers.is_empty(),
        "no keyAuth: no consumers"
    );
}

#[test]
fn rate_limiting_plugin_is_kong_3_with_top_level_config() {
    let cb = kong_bot(
        "bot",
        "    host: h.example.com\n    rateLimit: {second: 5, minute: 60, hour: 1000, day: 10000}\n",
    );
    let rendered = run(&cb, &[route("a", &[])], &[tenant("t", "")]).unwrap();
    let value = serde_json::to_value(plugin(&rendered, "bot-rate-limiting")).unwrap();
    assert_eq!(value["apiVersion"], "configuration.konghq.com/v1");
    assert_eq!(value["kind"], "KongPlugin");
    assert_eq!(value["plugin"], "rate-limiting");
    assert!(
        value.get("spec").is_none(),
        "KongPlugin has no spec: {value}"
    );
    let config = &value["config"];
    assert_eq!(config["second"], 5);
    assert_eq!(config["minute"], 60);
    assert_eq!(config["hour"], 1000);
    assert_eq!(config["day"], 10000);
    assert_eq!(
        config["limit_by"], "header",
        "default: one API key = one bucket"
    );
    assert_eq!(config["header_name"], "Authorization");
    assert_eq!(config["policy"], "local");
    assert_eq!(config["fault_tolerant"], true);
    assert_eq!(config["hide_client_headers"], false);
    assert_eq!(config["sync_rate"], -1);
    assert!(config.get("redis").is_none());
    assert!(
        !config
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("redis_")),
        "{config}"
    );
    assert!(rendered.kong_plugins.iter().all(|p| p.plugin != "key-auth"));
}

#[test]
fn header_name_only_when_limiting_by_header_and_redis_is_nested() {
    let cb = kong_bot(
        "bot",
        "    host: h.example.com\n    rateLimit: {minute: 60, limitBy: ip, policy: redis, redis: {host: kong-redis, timeout: 500}}\n",
    );
    let rendered = run(&cb, &[route("a", &[])], &[tenant("t", "")]).unwrap();
    let config = &plugin(&rendered, "bot-rate-limiting").config;
    assert_eq!(config["limit_by"], "ip");
    assert!(config.get("header_name").is_none(), "{config}");
    assert_eq!(config["policy"], "redis");
    assert_eq!(
        config["redis"],
        serde_json::json!({"host": "kong-redis", "port": 6379, "timeout": 500})
    );
    assert!(
        !config
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("redis_")),
        "never the deprecated flat redis_* fields: {config}"
    );
}

#[test]
fn redis_policy_without_redis_is_an_error() {
    let cb = kong_bot(
        "bot",
        "    host: h.example.com\n    rateLimit: {minute: 60, policy: redis}\n",
    );
    let problems = errors(run(&cb, &[route("a", &[])], &[tenant("t", "")]));
    assert_one_error(
        &problems,
        "Chatbot/ns/bot",
        "spec.kong.rateLimit.redis",
        "redis",
    );
}

#[test]
fn key_auth_renders_a_plugin_and_one_consumer_per_tenant_owned_by_it() {
    let cb = kong_bot(
        "bot",
        "    host: h.example.com\n    ingressClassName: edge\n    keyAuth: true\n",
    );
    let mut own = tenant(
        "acme",
        "apiKeys: [{secretRef: {name: llm, key: k}}, {secretRef: {name: redis, key: url}}]",
    );
    own.metadata.uid = Some("tenant-uid".into());
    let tenants = [tenant("globex", ""), own];
    let rendered = run(&cb, &[route("a", &[])], &tenants).unwrap();
    let key_auth = plugin(&rendered, "bot-key-auth");
    assert_eq!(key_auth.plugin, "key-auth");
    assert_eq!(
        key_auth.config,
        serde_json::json!({"key_names": ["apikey", "x-api-key"], "hide_credentials": false})
    );
    let names: Vec<_> = rendered
        .kong_consumers
        .iter()
        .map(|c| (c.metadata.name.clone().unwrap(), c.username.clone()))
        .collect();
    assert_eq!(
        names,
        [
            ("ns-acme".to_string(), "ns-acme".to_string()),
            ("ns-globex".to_string(), "ns-globex".to_string())
        ]
    );
    let acme = &rendered.kong_consumers[0];
    assert_eq!(acme.credentials, ["acme-kong-key", "acme-kong-key-1"]);
    assert_eq!(
        acme.metadata.annotations.as_ref().unwrap()["kubernetes.io/ingress.class"],
        "edge"
    );
    let owner = &acme.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Tenant", "tenant-uid")
    );
    // Credentials: names and sources only, the generated key for a Tenant without keys.
    let creds: Vec<_> = rendered
        .kong_credentials
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.source.name.as_str(),
                c.source.key.as_str(),
            )
        })
        .collect();
    assert_eq!(
        creds,
        [
            ("acme-kong-key", "llm", "k"),
            ("acme-kong-key-1", "redis", "url"),
            ("globex-kong-key", "globex-api-key", "api-key"),
        ]
    );
    assert!(
        rendered
            .kong_credentials
            .iter()
            .all(|c| c.labels["konghq.com/credential"] == "key-auth")
    );
    // Credential Secrets are never among the printed objects.
    assert!(!rendered.to_yaml().unwrap().contains("kind: Secret"));
}

#[test]
fn kong_names_are_bounded() {
    let long = "b".repeat(60);
    let cb = kong_bot(
        &long,
        "    host: h.example.com\n    rateLimit: {minute: 1}\n    keyAuth: true\n",
    );
    let t = "t".repeat(60);
    let rendered = run(&cb, &[route("a", &[])], &[tenant(&t, "")]).unwrap();
    let mut all: Vec<String> = rendered
        .kong_plugins
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    all.extend(rendered.kong_consumers.iter().map(|c| c.username.clone()));
    all.extend(rendered.kong_credentials.iter().map(|c| c.name.clone()));
    all.push(rendered.ingress.unwrap().metadata.name.unwrap());
    assert_eq!(all.len(), 5);
    for name in &all {
        assert!(name.len() <= 63, "{name}");
    }
    assert_eq!(
        rendered.kong_consumers[0].username,
        parley_crds::names::bounded_name(&format!("ns-{t}"))
    );
}

#[test]
fn limit_by_consumer_without_key_auth_is_a_warning() {
    let cb = kong_bot(
        "bot",
        "    host: h.example.com\n    rateLimit: {minute: 60, limitBy: consumer}\n",
    );
    let rendered = run(&cb, &[route("a", &[])], &[tenant("t", "")]).unwrap();
    assert!(
        rendered
            .warnings
            .iter()
            .any(|w| w.field == "spec.kong.rateLimit.limitBy"),
        "{:?}",
        rendered.warnings
    );
    assert!(
        !rendered
            .warnings
            .iter()
            .any(|w| w.message.contains("does not render Kong"))
    );
}

#[test]
fn selects_tenant_applies_namespace_and_selector() {
    let all = chatbot("bot", "");
    let picky = chatbot("bot", "  tenantSelector: {matchLabels: {team: a}}\n");
    let mut a = tenant("a", "");
    a.metadata.labels = Some(BTreeMap::from([("team".to_string(), "a".to_string())]));
    let b = tenant("b", "");
    let mut elsewhere = tenant("c", "");
    elsewhere.metadata.namespace = Some("other".into());
    assert!(selects_tenant(&all, &a) && selects_tenant(&all, &b));
    assert!(selects_tenant(&picky, &a) && !selects_tenant(&picky, &b));
    assert!(!selects_tenant(&all, &elsewhere));
}

#[test]
fn tenant_entries_for_models_served_elsewhere_are_left_out() {
    // One Tenant shared by two Chatbots: this one serves only `a`.
    let shared = tenant(
        "shared",
        "allowedModels: [a, b], modelQuotas: [{model: b, requestsPerMinute: 1}], upstreamKeys: [{model: b, backend: primary, secretRef: {name: llm, key: k}}]",
    );
    let elsewhere = tenant("elsewhere", "allowedModels: [b]");
    let rendered = run(
        &chatbot("bot", ""),
        &[route("a", &[])],
        &[shared, elsewhere],
    )
    .unwrap();
    assert_eq!(
        rendered.tenants,
        vec!["ns/shared"],
        "{:?}",
        rendered.warnings
    );
    let text = &rendered.config_map.data.as_ref().unwrap()["config.yaml"];
    // The gateway would refuse entries naming no model of the config.
    let config = parley_crds::GatewayConfig::from_yaml(text).unwrap();
    let t = &config.tenants[0];
    assert_eq!(t.allowed_models, vec!["a"]);
    assert!(t.model_quotas.is_empty() && t.upstream_keys.is_empty());
    for (object, field) in [
        ("Tenant/ns/shared", "spec.allowedModels[1]"),
        ("Tenant/ns/elsewhere", "spec.allowedModels"),
    ] {
        assert!(
            rendered
                .warnings
                .iter()
                .any(|w| w.object == object && w.field == field),
            "no warning on {object} {field}: {:?}",
            rendered.warnings
        );
    }
}
