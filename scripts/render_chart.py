"""Render and lint the cloudlb Helm chart offline, like `helm lint` + `helm template`.

Run through scripts/render-chart, which picks the Python of the tools venv that
scripts/install-test-deps makes (PyPI helm-python-sdk: the Helm v4 engine, no helm binary; and
yamllint). See `scripts/render-chart --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import helm_python as helm
import yaml
from helm_python import _native
from yamllint import linter
from yamllint.config import YamlLintConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CHART = os.path.join(ROOT, "charts", "cloudlb")

# Helm's install order (pkg/release/util/kind_sorter.go), so the output applies in a sane order.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]

# The rendered manifests: standard YAML hygiene, but Helm's toYaml writes sequences without
# indentation while hand-written templates indent them, and `---` documents have no end marker.
YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: {max: 200, allow-non-breakable-inline-mappings: true}
  indentation: {spaces: consistent, indent-sequences: whatever}
  document-start: {present: true}
  comments: {min-spaces-from-content: 1}
  truthy: {allowed-values: ['true', 'false'], check-keys: false}
"""


def fail(message: str) -> None:
    print(f"render-chart: {message}", file=sys.stderr)
    sys.exit(1)


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def user_values(args: argparse.Namespace) -> dict:
    """-f files in order, then --set/--set-string/--set-json in order (later wins), like helm."""
    values: dict = {}
    for path in args.values:
        try:
            with open(path, encoding="utf-8") as f:
                values = deep_merge(values, helm.values_from_yaml(f.read()) or {})
        except OSError as e:
            fail(f"cannot read values file {path}: {e}")
        except helm.HelmError as e:
            fail(f"values file {path}: {e}")
    for kind, expression in args.sets:
        parse = {
            "set": helm.parse_set_string,
            "set-string": helm.parse_set_string_values,
            "set-json": helm.parse_set_json,
        }[kind]
        try:
            values = deep_merge(values, parse(expression))
        except helm.HelmError as e:
            fail(f"--{kind} {expression}: {e}")
    return values


def render(chart: helm.Chart, values: dict, args: argparse.Namespace) -> dict[str, str]:
    opts: dict = {"name": args.release, "namespace": args.namespace, "is_install": True}
    if args.kube_version:
        # The Python wrapper of helm-python-sdk 0.2.2 does not expose these render options, but
        # its C library takes them (as `helm template --kube-version/--api-versions` do).
        opts["kube_version"] = args.kube_version
    if args.api_versions:
        opts["api_versions"] = args.api_versions
    rendered = _native.call_string(
        "helm_render", chart._raw(), json.dumps(values), json.dumps(opts)
    )
    return json.loads(rendered)


def documents(rendered: dict[str, str]) -> list[tuple[str, str, dict]]:
    """(source, text, object) for every non-empty manifest, in Helm's install order."""
    docs = []
    for source, text in rendered.items():
        base = os.path.basename(source)
        if base == "NOTES.txt" or base.startswith("_"):
            continue
        for part in ("\n" + text).split("\n---"):
            body = part.strip("\n")
            try:
                obj = yaml.safe_load(body)
            except yaml.YAMLError as e:
                fail(f"{source} rendered invalid YAML: {e}\n{body}")
            if not obj:
                continue
            if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
                fail(f"{source} rendered something that is not a Kubernetes object:\n{body}")
            docs.append((source, body, obj))

    def order(doc: tuple[str, str, dict]) -> int:
        kind = doc[2]["kind"]
        return INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)

    return sorted(docs, key=order)


def crd_documents(chart: helm.Chart) -> list[tuple[str, str, dict]]:
    docs = []
    for crd in chart.crds:
        text = crd["data"].strip("\n")
        docs.append((crd["filename"], text, yaml.safe_load(text)))
    return docs


def lint(chart_path: str, values: dict, args: argparse.Namespace) -> None:
    report = helm.lint(
        chart_path,
        values,
        strict=True,
        namespace=args.namespace,
        kube_version=args.kube_version or None,
    )
    problems = []
    for m in report.get("messages", []):
        severity = m.get("severity", 0)
        line = f"[{ {1: 'INFO', 2: 'WARNING', 3: 'ERROR'}.get(severity, 'UNKNOWN')}] {m.get('path')}: {m.get('error', '').strip()}"
        if severity >= 2:
            problems.append(line)
        elif args.verbose:
            print(f"helm lint: {line}", file=sys.stderr)
    if problems:
        fail("helm lint failed:\n" + "\n".join(problems))


def yamllint_text(name: str, text: str, config: YamlLintConfig) -> list[str]:
    return [
        f"{name}:{p.line}:{p.column}: [{p.level}] {p.desc} ({p.rule})"
        for p in linter.run(text, config)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/render-chart",
        description="Lint the cloudlb chart with the given values (helm lint --strict), render it "
        "(helm template) to stdout, and yamllint the result. Exits non-zero, printing nothing on "
        "stdout, when any step fails: a schema error (unknown or mistyped value), a template "
        "error, a lint warning or a YAML problem.",
    )
    parser.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                        help="a values file (repeatable; later files win)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="K=V",
                        type=lambda s: ("set", s), help="like helm --set (repeatable)")
    parser.add_argument("--set-string", dest="sets", action="append", metavar="K=V",
                        type=lambda s: ("set-string", s), help="like helm --set-string")
    parser.add_argument("--set-json", dest="sets", action="append", metavar="K=JSON",
                        type=lambda s: ("set-json", s), help="like helm --set-json")
    parser.add_argument("--release", "--name", default="cloudlb", help="release name (default cloudlb)")
    parser.add_argument("-n", "--namespace", default="cloudlb-system",
                        help="release namespace (default cloudlb-system)")
    parser.add_argument("--kube-version", default="",
                        help="Kubernetes version to render for, e.g. v1.20.2 (default: Helm's)")
    parser.add_argument("--api-versions", action="append", default=[], metavar="GROUP/VERSION[/KIND]",
                        help="an API version the cluster serves, for .Capabilities (repeatable)")
    parser.add_argument("--include-crds", action="store_true",
                        help="print the chart's CRDs first (like helm template --include-crds)")
    parser.add_argument("--no-lint", action="store_true", help="skip helm lint and yamllint")
    parser.add_argument("--chart", default=DEFAULT_CHART, help="chart directory (default charts/cloudlb)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print lint infos too")
    args = parser.parse_args()

    values = user_values(args)
    try:
        chart = helm.Chart.load(args.chart)
    except helm.HelmError as e:
        fail(f"cannot load the chart at {args.chart}: {e}")
    with chart:
        try:
            rendered = render(chart, values, args)
        except helm.HelmError as e:
            fail(f"rendering failed ({type(e).__name__}):\n{e}")
        docs = documents(rendered)
        if args.include_crds:
            docs = crd_documents(chart) + docs

    if not args.no_lint:
        lint(args.chart, values, args)
        config = YamlLintConfig(YAMLLINT_CONFIG)
        # The chart's own YAML files are single documents, without `---`.
        file_config = YamlLintConfig(YAMLLINT_CONFIG + "  document-start: disable\n")
        problems = []
        for name in ("Chart.yaml", "values.yaml"):
            with open(os.path.join(args.chart, name), encoding="utf-8") as f:
                problems += yamllint_text(name, f.read(), file_config)
        for source, text, _ in docs:
            problems += yamllint_text(source, f"---\n{text}\n", config)
        if problems:
            fail("yamllint found problems:\n" + "\n".join(problems))

    out = [f"---\n# Source: {source}\n{text}\n" for source, text, _ in docs]
    sys.stdout.write("".join(out))


if __name__ == "__main__":
    main()
