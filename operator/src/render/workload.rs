//! The Kubernetes objects that run a Chatbot's gateway fleet.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecretProjection, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec,
    SleepAction, TopologySpreadConstraint, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use parley_crds::common::SecretKeyRef;
use parley_crds::gateway_config::GatewayConfig;
use parley_crds::names::{bounded_name, child_name};
use parley_crds::{Chatbot, ModelRoute, Tenant};

use super::{ADMIN_PORT, CONFIG_DIR, CONFIG_KEY, HTTP_PORT, MANAGER, RenderInput, SECRETS_DIR};

/// Seconds the pod keeps serving after it is removed from the Service's endpoints, so
/// load balancers stop sending before the gateway stops accepting.
const PRESTOP_SLEEP_SECONDS: i64 = 5;
/// Extra time after the longest call may finish, before the kubelet kills the pod.
const GRACE_MARGIN_SECONDS: i64 = 5;
const UID: i64 = 65_532;

/// The Chatbot's workload, with what every object shares computed once.
pub(super) struct Workload<'a> {
    chatbot: &'a Chatbot,
    name: String,
    namespace: Option<String>,
    image: String,
    labels: BTreeMap<String, String>,
    selector: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
    /// Secret name -> (keys, optional).
    secrets: BTreeMap<String, (Vec<String>, bool)>,
    longest_call_seconds: i64,
}

impl<'a> Workload<'a> {
    pub(super) fn new(
        input: &RenderInput<'a>,
        routes: &[&ModelRoute],
        tenants: &[&Tenant],
        config: &GatewayConfig,
    ) -> Self {
        let chatbot = input.chatbot;
        let instance = bounded_name(&chatbot.name_any());
        let selector = BTreeMap::from([
            (
                "app.kubernetes.io/name".to_string(),
                "parley-gateway".to_string(),
            ),
            ("app.kubernetes.io/instance".to_string(), instance),
        ]);
        let mut labels = selector.clone();
        labels.insert("app.kubernetes.io/component".into(), "gateway".into());
        labels.insert("app.kubernetes.io/part-of".into(), "parley".into());
        labels.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
        // Only a live object has a uid; offline renders carry no owner reference.
        let owner = chatbot.controller_owner_ref(&());
        let longest_ms = config
            .models
            .iter()
            .flat_map(|m| m.backends.iter().map(|b| b.timeouts.total_ms))
            .max()
            .unwrap_or(0);
        let image = chatbot
            .spec
            .gateway
            .as_ref()
            .and_then(|g| g.image.clone())
            .unwrap_or_else(|| input.default_image.to_string());
        Self {
            chatbot,
            name: child_name(&chatbot.name_any(), "gateway"),
            namespace: chatbot.namespace(),
            image,
            labels,
            selector,
            owner,
            secrets: referenced_secrets(chatbot, routes, tenants),
            longest_call_seconds: i64::try_from(longest_ms.div_ceil(1000)).unwrap_or(i64::MAX / 4),
        }
    }

    fn metadata(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.clone()),
            namespace: self.namespace.clone(),
            labels: Some(self.labels.clone()),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }

    /// The labels of every child.
    pub(super) fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    fn max_replicas(&self) -> i32 {
        self.chatbot.spec.max_replicas()
    }

    fn autoscaling(&self) -> Option<&parley_crds::chatbot::Autoscaling> {
        self.chatbot
            .spec
            .gateway
            .as_ref()
            .and_then(|g| g.autoscaling.as_ref())
    }

    pub(super) fn service_account(&self) -> ServiceAccount {
        ServiceAccount {
            metadata: self.metadata(),
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        }
    }

    pub(super) fn config_map(&self, config_text: String) -> ConfigMap {
        ConfigMap {
            metadata: self.metadata(),
            data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), config_text)])),
            ..ConfigMap::default()
        }
    }

    pub(super) fn service(&self) -> Service {
        Service {
            metadata: self.metadata(),
            spec: Some(ServiceSpec {
                selector: Some(self.selector.clone()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::String("http".into())),
                    protocol: Some("TCP".into()),
                    app_protocol: Some("http".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    pub(super) fn autoscaler(&self) -> Option<HorizontalPodAutoscaler> {
        let autoscaling = self.autoscaling()?;
        Some(HorizontalPodAutoscaler {
            metadata: self.metadata(),
            spec: Some(HorizontalPodAutoscalerSpec {
                scale_target_ref: CrossVersionObjectReference {
                    api_version: Some("apps/v1".into()),
                    kind: "Deployment".into(),
                    name: self.name.clone(),
                },
                min_replicas: Some(autoscaling.min_replicas),
                max_replicas: autoscaling.max_replicas,
                metrics: Some(vec![MetricSpec {
                    type_: "Resource".into(),
                    resource: Some(ResourceMetricSource {
                        name: "cpu".into(),
                        target: MetricTarget {
                            type_: "Utilization".into(),
                            average_utilization: Some(
                                autoscaling.target_cpu_utilization_percentage.unwrap_or(70),
                            ),
                            ..MetricTarget::default()
                        },
                    }),
                    ..MetricSpec::default()
                }]),
                ..HorizontalPodAutoscalerSpec::default()
            }),
            ..HorizontalPodAutoscaler::default()
        })
    }

    pub(super) fn disruption_budget(&self) -> Option<PodDisruptionBudget> {
        if self.max_replicas() < 2 {
            return None;
        }
        let configured = self
            .chatbot
            .spec
            .gateway
            .as_ref()
            .and_then(|g| g.pod_disruption_budget.clone());
        let (min_available, max_unavailable) = match configured {
            Some(pdb) if pdb.min_available.is_some() || pdb.max_unavailable.is_some() => {
                (pdb.min_available, pdb.max_unavailable)
            }
            // minAvailable 1 would block every drain while an autoscaler runs one pod.
            _ if self.chatbot.spec.min_replicas() < 2 => (None, Some(IntOrString::Int(1))),
            _ => (Some(IntOrString::Int(1)), None),
        };
        Some(PodDisruptionBudget {
            metadata: self.metadata(),
            spec: Some(PodDisruptionBudgetSpec {
                selector: Some(LabelSelector {
                    match_labels: Some(self.selector.clone()),
                    ..LabelSelector::default()
                }),
                min_available,
                max_unavailable,
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        })
    }

    pub(super) fn deployment(&self) -> Deployment {
        // Under an HPA the Deployment must not set replicas, or the two fight.
        let replicas = match self.autoscaling() {
            Some(_) => None,
            None => Some(
                self.chatbot
                    .spec
                    .gateway
                    .as_ref()
                    .and_then(|g| g.replicas)
                    .unwrap_or(1),
            ),
        };
        let drain_seconds = self.longest_call_seconds + 1;
        let grace = self.longest_call_seconds + PRESTOP_SLEEP_SECONDS + GRACE_MARGIN_SECONDS;
        let mut pod_annotations = BTreeMap::new();
        pod_annotations.insert("prometheus.io/scrape".to_string(), "true".to_string());
        pod_annotations.insert("prometheus.io/port".to_string(), ADMIN_PORT.to_string());
        pod_annotations.insert("prometheus.io/path".to_string(), "/metrics".to_string());

        let container = Container {
            name: "gateway".into(),
            image: Some(self.image.clone()),
            args: Some(vec![
                "--config".into(),
                format!("{CONFIG_DIR}/{CONFIG_KEY}"),
                "--log-format".into(),
                "json".into(),
                "--drain-seconds".into(),
                drain_seconds.to_string(),
            ]),
            ports: Some(vec![
                ContainerPort {
                    name: Some("http".into()),
                    container_port: HTTP_PORT,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                },
                ContainerPort {
                    name: Some("admin".into()),
                    container_port: ADMIN_PORT,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                },
            ]),
            resources: Some(self.resources()),
            liveness_probe: Some(probe("/healthz", 10, 3)),
            readiness_probe: Some(probe("/readyz", 5, 2)),
            lifecycle: Some(Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    sleep: Some(SleepAction {
                        seconds: PRESTOP_SLEEP_SECONDS,
                    }),
                    ..LifecycleHandler::default()
                }),
                ..Lifecycle::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                run_as_user: Some(UID),
                run_as_group: Some(UID),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Capabilities::default()
                }),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(self.volume_mounts()),
            ..Container::default()
        };

        Deployment {
            metadata: self.metadata(),
            spec: Some(DeploymentSpec {
                replicas,
                selector: LabelSelector {
                    match_labels: Some(self.selector.clone()),
                    ..LabelSelector::default()
                },
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(1)),
                        max_unavailable: Some(IntOrString::Int(0)),
                    }),
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(self.labels.clone()),
                        annotations: Some(pod_annotations),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        service_account_name: Some(self.name.clone()),
                        automount_service_account_token: Some(false),
                        termination_grace_period_seconds: Some(grace),
                        security_context: Some(PodSecurityContext {
                            run_as_non_root: Some(true),
                            run_as_user: Some(UID),
                            run_as_group: Some(UID),
                            fs_group: Some(UID),
                            seccomp_profile: Some(SeccompProfile {
                                type_: "RuntimeDefault".into(),
                                ..SeccompProfile::default()
                            }),
                            ..PodSecurityContext::default()
                        }),
                        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                            max_skew: 1,
                            topology_key: "kubernetes.io/hostname".into(),
                            when_unsatisfiable: "ScheduleAnyway".into(),
                            label_selector: Some(LabelSelector {
                                match_labels: Some(self.selector.clone()),
                                ..LabelSelector::default()
                            }),
                            ..TopologySpreadConstraint::default()
                        }]),
                        containers: vec![container],
                        volumes: Some(self.volumes()),
                        ..PodSpec::default()
                    }),
                },
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }
    }

    fn resources(&self) -> ResourceRequirements {
        if let Some(resources) = self
            .chatbot
            .spec
            .gateway
            .as_ref()
            .and_then(|g| g.resources.clone())
        {
            return resources;
        }
        let quantities = |cpu: &str, memory: &str| {
            BTreeMap::from([
                ("cpu".to_string(), Quantity(cpu.to_string())),
                ("memory".to_string(), Quantity(memory.to_string())),
            ])
        };
        ResourceRequirements {
            requests: Some(quantities("250m", "256Mi")),
            limits: Some(quantities("500m", "512Mi")),
            ..ResourceRequirements::default()
        }
    }

    fn volume_mounts(&self) -> Vec<VolumeMount> {
        let mut mounts = vec![
            VolumeMount {
                name: "config".into(),
                mount_path: CONFIG_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            },
        ];
        if !self.secrets.is_empty() {
            mounts.push(VolumeMount {
                name: "secrets".into(),
                mount_path: SECRETS_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
        mounts
    }

    fn volumes(&self) -> Vec<Volume> {
        let mut volumes = vec![
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: self.name.clone(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity("64Mi".into())),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            },
        ];
        if !self.secrets.is_empty() {
            let sources = self
                .secrets
                .iter()
                .map(|(secret, (keys, optional))| VolumeProjection {
                    secret: Some(SecretProjection {
                        name: secret.clone(),
                        items: Some(
                            keys.iter()
                                .map(|key| KeyToPath {
                                    key: key.clone(),
                                    path: format!("{secret}/{key}"),
                                    mode: None,
                                })
                                .collect(),
                        ),
                        optional: optional.then_some(true),
                    }),
                    ..VolumeProjection::default()
                })
                .collect();
            volumes.push(Volume {
                name: "secrets".into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(sources),
                    default_mode: Some(0o440),
                }),
                ..Volume::default()
            });
        }
        volumes
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Every Secret key the gateway reads, grouped by Secret. Generated tenant key Secrets
/// are optional: the Tenant controller creates them, and a pod must start without them.
fn referenced_secrets(
    chatbot: &Chatbot,
    routes: &[&ModelRoute],
    tenants: &[&Tenant],
) -> BTreeMap<String, (Vec<String>, bool)> {
    let mut refs: Vec<(SecretKeyRef, bool)> = Vec::new();
    for route in routes {
        refs.extend(
            route
                .spec
                .backends
                .iter()
                .filter_map(|b| b.api_key_secret_ref.clone())
                .map(|r| (r, false)),
        );
    }
    for tenant in tenants {
        let generated = tenant.spec.api_keys.is_empty();
        refs.extend(tenant.api_key_refs().into_iter().map(|r| (r, generated)));
        refs.extend(
            tenant
                .spec
                .upstream_keys
                .iter()
                .map(|k| (k.secret_ref.clone(), false)),
        );
    }
    if let Some(redis) = &chatbot.spec.redis {
        refs.push((redis.url_secret_ref.clone(), false));
    }
    if let Some(usage) = &chatbot.spec.usage {
        refs.push((usage.postgres_url_secret_ref.clone(), false));
    }
    let mut secrets: BTreeMap<String, (Vec<String>, bool)> = BTreeMap::new();
    for (secret, optional) in refs {
        let entry = secrets
            .entry(secret.name)
            .or_insert_with(|| (Vec::new(), true));
        if !entry.0.contains(&secret.key) {
            entry.0.push(secret.key);
        }
        // A Secret is optional only if every reference to it is.
        entry.1 &= optional;
    }
    for (keys, _) in secrets.values_mut() {
        keys.sort();
    }
    secrets
}
