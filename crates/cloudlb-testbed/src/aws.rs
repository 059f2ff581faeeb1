//! The AWS emulator (moto server), SDK clients pointed at it, and EC2 fixtures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_ec2::config::{
    ConfigBag, Credentials, Intercept, RuntimeComponents, SharedCredentialsProvider,
};
use aws_sdk_ec2::types::{
    InstanceType, ResourceType, Tag as Ec2Tag, TagSpecification as Ec2TagSpecification,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use crate::process::{
    ManagedProcess, TempDir, announce_started, cache_dir, find_binary, free_port,
    start_on_free_ports,
};

pub use aws_sdk_ec2 as ec2;
pub use aws_sdk_elasticloadbalancingv2 as elbv2;

pub const REGION: &str = "us-east-1";
/// The two availability zones the fixtures use.
pub const ZONES: [&str; 2] = ["us-east-1a", "us-east-1b"];
/// An AMI id from moto's built-in image list (moto does not validate AMIs by default).
pub const TEST_AMI: &str = "ami-12c6146b";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

static SHARED: OnceCell<AwsEmulator> = OnceCell::const_new();

/// Lookup fixes for moto (see the file), for [`AwsEmulator::start_with`].
const MOTO_SPEEDUPS: &str = include_str!("moto_speedups.py");

pub(crate) fn shared_if_started() -> Option<&'static AwsEmulator> {
    SHARED.get()
}

/// Adds `x-moto-account-id: <account>` to every request, so each test gets its own, fully
/// separate moto account (moto's `/moto-api/reset` would wipe every test's state at once).
#[derive(Debug, Clone)]
pub struct AccountHeader(pub String);

impl Intercept for AccountHeader {
    fn name(&self) -> &'static str {
        "MotoAccountHeader"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        context
            .request_mut()
            .headers_mut()
            .try_insert("x-moto-account-id", self.0.clone())?;
        Ok(())
    }
}

/// SDK configuration for moto: region us-east-1, static test credentials carrying the account
/// id, `endpoint_url = endpoint`. Clients built from it still need [`AccountHeader`] (see
/// [`AwsEmulator::clients`]) for moto to put their resources in that account.
pub fn aws_sdk_config(endpoint: &str, account_id: &str) -> SdkConfig {
    let credentials = Credentials::builder()
        .access_key_id("AKIACLOUDLBTEST00000")
        .secret_access_key("cloudlb-test-secret")
        .account_id(account_id)
        .provider_name("cloudlb-testbed")
        .build();
    SdkConfig::builder()
        .region(Region::new(REGION))
        .credentials_provider(SharedCredentialsProvider::new(credentials))
        .endpoint_url(endpoint)
        .behavior_version(BehaviorVersion::latest())
        .build()
}

/// ELBv2 and EC2 clients that act in moto `account`, through `endpoint` (moto itself, or a
/// [`crate::faultproxy::FaultProxy`] in front of it).
pub fn clients_at(endpoint: &str, account: &str) -> (elbv2::Client, ec2::Client) {
    let sdk_config = aws_sdk_config(endpoint, account);
    let header = AccountHeader(account.to_string());
    let elbv2 = elbv2::Client::from_conf(
        elbv2::config::Builder::from(&sdk_config)
            .interceptor(header.clone())
            .build(),
    );
    let ec2 = ec2::Client::from_conf(
        ec2::config::Builder::from(&sdk_config)
            .interceptor(header)
            .build(),
    );
    (elbv2, ec2)
}

/// One moto server per test process, on a free loopback port.
pub struct AwsEmulator {
    // Field order is drop order: the process first, then its directory.
    process: ManagedProcess,
    endpoint: String,
    start_time: Duration,
    /// moto's working directory, removed on drop (kept when a test failed).
    _dir: TempDir,
}

impl AwsEmulator {
    /// The process-wide emulator, started on first use and killed when the test binary exits.
    /// Tests sharing it isolate themselves with [`AwsEmulator::new_account`].
    pub async fn shared() -> &'static AwsEmulator {
        SHARED.get_or_init(AwsEmulator::start).await
    }

    /// A private moto server; killed when dropped.
    pub async fn start() -> AwsEmulator {
        Self::start_with(false).await
    }

    /// A private moto server; `speedups`: with the lookup fixes of `moto_speedups.py` (loaded as
    /// `sitecustomize`; they change no result, only skip moto's O(everything) scans, which bound
    /// the benchmark at 1000 instances).
    pub async fn start_with(speedups: bool) -> AwsEmulator {
        let started = Instant::now();
        let dir = TempDir::new().expect("create a scratch directory for moto");
        let moto = find_binary("CLOUDLB_MOTO_SERVER", "moto-venv/bin/moto_server", &[]);
        let mut env = Vec::new();
        if speedups {
            let site = dir.path().join("moto-site");
            std::fs::create_dir_all(&site)
                .and_then(|()| std::fs::write(site.join("sitecustomize.py"), MOTO_SPEEDUPS))
                .unwrap_or_else(|e| panic!("write moto's sitecustomize.py: {e}"));
            env.push(("PYTHONPATH", site.display().to_string()));
        }
        let (moto, env, scratch) = (&moto, &env, &dir);
        let started_on = start_on_free_ports("moto", || async move {
            let port = free_port();
            let args = ["-H", "127.0.0.1", "-p", &port.to_string()].map(String::from);
            let mut process =
                ManagedProcess::spawn_with_env("moto", moto, &args, env, scratch.path())
                    .map_err(|e| format!("start moto_server: {e}"))?;
            wait_ready(&mut process, port).await?;
            Ok((process, format!("http://127.0.0.1:{port}")))
        })
        .await;
        let (process, endpoint) = started_on.unwrap_or_else(|log| {
            panic!(
                "moto server did not start (venv {}; run scripts/install-test-deps):\n{log}",
                cache_dir().join("moto-venv").display()
            )
        });
        let start_time = started.elapsed();
        announce_started("moto server", start_time, &endpoint, &dir);
        AwsEmulator {
            process,
            endpoint,
            start_time,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    /// A fresh 12-digit account id, unique per call (and per test process).
    /// A certificate moto's ACM issues at once in `account`, for `domain`: its ARN. moto checks
    /// that a TLS listener's certificate exists. (One JSON call through curl: the testbed has no
    /// ACM client.)
    pub fn request_certificate(&self, account: &str, domain: &str) -> String {
        let out = crate::process::run_ok(
            std::process::Command::new("curl")
                .args(["-sS", "--fail", "-X", "POST", &self.endpoint])
                .args(["-H", "X-Amz-Target: CertificateManager.RequestCertificate"])
                .args(["-H", "Content-Type: application/x-amz-json-1.1"])
                .args(["-H", &format!("x-moto-account-id: {account}")])
                .args(["-H", &format!(
                    "Authorization: AWS4-HMAC-SHA256 Credential=AKIACLOUDLBTEST00000/20260101/{REGION}/acm/aws4_request, SignedHeaders=host, Signature=0"
                )])
                .args(["--data", &format!("{{\"DomainName\": \"{domain}\"}}")]),
        );
        let answer: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("RequestCertificate answers JSON");
        answer["CertificateArn"]
            .as_str()
            .unwrap_or_else(|| panic!("RequestCertificate: no CertificateArn in {answer}"))
            .to_string()
    }

    pub fn new_account(&self) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("9{:05}{:06}", std::process::id() % 100_000, n % 1_000_000)
    }

    /// SDK configuration for `account` (see [`aws_sdk_config`]).
    pub fn sdk_config(&self, account: &str) -> SdkConfig {
        aws_sdk_config(&self.endpoint, account)
    }

    /// ELBv2 and EC2 clients that act in `account`.
    pub fn clients(&self, account: &str) -> (elbv2::Client, ec2::Client) {
        clients_at(&self.endpoint, account)
    }

    /// The last `n` lines of the moto log.
    pub fn log_tail(&self, n: usize) -> String {
        self.process.log_section(n)
    }
}

async fn wait_ready(process: &mut ManagedProcess, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = process.exited() {
            return Err(format!(
                "moto_server exited early ({status}):\n{}",
                process.log_section(40)
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "moto_server was not ready within {READY_TIMEOUT:?}:\n{}",
                process.log_section(40)
            ));
        }
        if http_get_ok(port, "/moto-api/data.json").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A minimal HTTP/1.0 GET; true on a 200 answer.
async fn http_get_ok(port: u16, path: &str) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<bool, std::io::Error>(head.starts_with(b"HTTP/1.") && &head[9..12] == b"200")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}

/// A subnet created by [`create_vpc_with_subnets`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subnet {
    pub id: String,
    pub az: String,
    pub cidr: String,
}

/// A VPC 10.0.0.0/16 with one public and one private subnet in each of [`ZONES`].
#[derive(Debug, Clone)]
pub struct Network {
    pub vpc_id: String,
    /// Tagged `kubernetes.io/role/elb=1` and `kubernetes.io/cluster/<cluster>=owned`.
    pub public_subnets: Vec<Subnet>,
    /// Tagged `kubernetes.io/role/internal-elb=1` and `kubernetes.io/cluster/<cluster>=owned`.
    pub private_subnets: Vec<Subnet>,
}

impl Network {
    pub fn public_subnet_ids(&self) -> Vec<String> {
        self.public_subnets.iter().map(|s| s.id.clone()).collect()
    }

    pub fn private_subnet_ids(&self) -> Vec<String> {
        self.private_subnets.iter().map(|s| s.id.clone()).collect()
    }
}

fn ec2_tags(resource: ResourceType, tags: &[(&str, &str)]) -> Ec2TagSpecification {
    tags.iter()
        .fold(
            Ec2TagSpecification::builder().resource_type(resource),
            |b, (k, v)| b.tags(Ec2Tag::builder().key(*k).value(*v).build()),
        )
        .build()
}

/// Creates the VPC and four subnets of a cluster called `cluster_name`.
pub async fn create_vpc_with_subnets(ec2: &ec2::Client, cluster_name: &str) -> Network {
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .tag_specifications(ec2_tags(
            ResourceType::Vpc,
            &[("Name", &format!("{cluster_name}-vpc"))],
        ))
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateVpc: {e:?}"));
    let vpc_id = vpc
        .vpc()
        .and_then(|v| v.vpc_id())
        .expect("CreateVpc returned a VPC id")
        .to_string();
    let cluster_tag = format!("kubernetes.io/cluster/{cluster_name}");
    let mut public_subnets = Vec::new();
    let mut private_subnets = Vec::new();
    for (i, az) in ZONES.iter().enumerate() {
        for (public, cidr) in [
            (true, format!("10.0.{}.0/20", i * 16)),
            (false, format!("10.0.{}.0/20", 128 + i * 16)),
        ] {
            let role = if public {
                "kubernetes.io/role/elb"
            } else {
                "kubernetes.io/role/internal-elb"
            };
            let kind = if public { "public" } else { "private" };
            let name = format!("{cluster_name}-{kind}-{az}");
            let created = ec2
                .create_subnet()
                .vpc_id(&vpc_id)
                .cidr_block(&cidr)
                .availability_zone(*az)
                .tag_specifications(ec2_tags(
                    ResourceType::Subnet,
                    &[("Name", &name), (role, "1"), (&cluster_tag, "owned")],
                ))
                .send()
                .await
                .unwrap_or_else(|e| panic!("CreateSubnet {cidr} in {az}: {e:?}"));
            let subnet = Subnet {
                id: created
                    .subnet()
                    .and_then(|s| s.subnet_id())
                    .expect("CreateSubnet returned a subnet id")
                    .to_string(),
                az: az.to_string(),
                cidr,
            };
            if public {
                public_subnets.push(subnet);
            } else {
                private_subnets.push(subnet);
            }
        }
    }
    Network {
        vpc_id,
        public_subnets,
        private_subnets,
    }
}

/// An EC2 instance standing in for a Kubernetes node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub az: String,
    pub private_ip: String,
}

/// Launches `n` instances in `subnet_id`.
pub async fn run_instances(ec2: &ec2::Client, subnet_id: &str, n: i32) -> Vec<Instance> {
    // As EC2 does (moto leaves them without any): the VPC's default security group.
    let subnets = ec2
        .describe_subnets()
        .subnet_ids(subnet_id)
        .send()
        .await
        .unwrap_or_else(|e| panic!("DescribeSubnets {subnet_id}: {e:?}"));
    let vpc = subnets
        .subnets()
        .first()
        .and_then(|s| s.vpc_id())
        .unwrap_or_else(|| panic!("subnet {subnet_id} has a VPC"))
        .to_string();
    let filter = |name: &str, value: &str| {
        aws_sdk_ec2::types::Filter::builder()
            .name(name)
            .values(value)
            .build()
    };
    let groups = ec2
        .describe_security_groups()
        .filters(filter("vpc-id", &vpc))
        .filters(filter("group-name", "default"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("the default security group of {vpc}: {e:?}"));
    let default_group = groups
        .security_groups()
        .first()
        .and_then(|g| g.group_id())
        .unwrap_or_else(|| panic!("{vpc} has a default security group"))
        .to_string();
    let output = ec2
        .run_instances()
        .security_group_ids(default_group)
        .image_id(TEST_AMI)
        .instance_type(InstanceType::T3Medium)
        .min_count(n)
        .max_count(n)
        .subnet_id(subnet_id)
        .send()
        .await
        .unwrap_or_else(|e| panic!("RunInstances in {subnet_id}: {e:?}"));
    output
        .instances()
        .iter()
        .map(|i| Instance {
            id: i
                .instance_id()
                .expect("RunInstances returned an instance id")
                .to_string(),
            az: i
                .placement()
                .and_then(|p| p.availability_zone())
                .expect("RunInstances returned a placement")
                .to_string(),
            private_ip: i
                .private_ip_address()
                .expect("RunInstances returned a private IP")
                .to_string(),
        })
        .collect()
}
