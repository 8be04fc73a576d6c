"""Parses OpenMetrics text from stdin with the Prometheus reference parser (prometheus_client)
and prints every sample as a JSON line: {"name", "labels", "value"}. A parse error fails."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        print(json.dumps({"family": family.name, "type": family.type, "name": sample.name,
                          "labels": sample.labels, "value": sample.value}))
