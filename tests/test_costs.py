"""The gate before any spend: exact token counts, the time and cost estimate, prices from the
Retail Prices API (a recorded answer served over real HTTP) or the settings' table, the budget,
and Azure ML's vCPU quota through the SDK against the transport-level fake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shared.backends.azureml.backend import AzureMLBackend, PreflightError
from shared.backends.azureml.quota import deployment_need
from shared.backends.interface import JobRequest
from shared.costs.estimate import Estimate, budget_refusal
from shared.costs.gate import check_before_spending
from shared.costs.prices import PriceBook
from shared.datasets.prepare import InputInfo, Preparation, prepare_dataset
from shared.datasets.sample import write_sample
from shared.datasets.sources import file_chunks
from shared.settings import DatasetSettings, load_settings
from shared.vocabulary import TEST_FILE, TRAIN_FILE
from tests.fake_azureml import WORKSPACE_ENV, FakeAzureML, FakeCredential

REPO = Path(__file__).resolve().parent.parent

# A recorded answer of the Retail Prices API for one VM size and region, in the documented shape
# (learn.microsoft.com/rest/api/cost-management/retail-prices/azure-retail-prices): the Linux
# pay-as-you-go meter beside its Spot, Low Priority and Windows siblings, over two pages.
LINUX = {"currencyCode": "USD", "tierMinimumUnits": 0.0, "retailPrice": 3.673, "unitPrice": 3.673,
         "armRegionName": "eastus", "location": "US East", "effectiveStartDate": "2022-06-01T00:00:00Z",
         "meterId": "0b1d1e07-6f2f-5b0f-8b7e-6c5d8e2f0a11", "meterName": "NC24ads A100 v4",
         "productId": "DZH318Z0CSHK", "skuId": "DZH318Z0CSHK/00JT", "productName": "Virtual Machines NCadsv4 Series",
         "skuName": "NC24ads A100 v4", "serviceName": "Virtual Machines", "serviceId": "DZH313Z7MMC8",
         "serviceFamily": "Compute", "unitOfMeasure": "1 Hour", "type": "Consumption", "isPrimaryMeterRegion": True,
         "armSkuName": "Standard_NC24ads_A100_v4"}  # fmt: skip
PAGES = [
    {"BillingCurrency": "USD", "CustomerEntityId": "Default", "CustomerEntityType": "Retail", "Count": 3,
     "NextPageLink": "{base}?page=2", "Items": [
         {**LINUX, "retailPrice": 0.7346, "meterName": "NC24ads A100 v4 Spot", "skuName": "NC24ads A100 v4 Spot"},
         {**LINUX, "retailPrice": 5.513, "productName": "Virtual Machines NCadsv4 Series Windows"},
         {**LINUX, "retailPrice": 0.5, "meterName": "NC24ads A100 v4 Low Priority",
          "skuName": "NC24ads A100 v4 Low Priority"}]},
    {"BillingCurrency": "USD", "CustomerEntityId": "Default", "CustomerEntityType": "Retail", "Count": 1,
     "NextPageLink": None, "Items": [LINUX]},
]  # fmt: skip


@pytest.fixture
def retail_prices() -> Iterator[tuple[str, list[dict[str, list[str]]]]]:
    """A local server answering as the Retail Prices API did; the queries it received."""
    queries: list[dict[str, list[str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            queries.append(query)
            base = f"http://127.0.0.1:{self.server.server_address[1]}/api/retail/prices"
            page = PAGES[1] if query.get("page") == ["2"] else PAGES[0]
            body = json.dumps({**page, "NextPageLink": page["NextPageLink"] and base + "?page=2"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/retail/prices", queries
    server.shutdown()


def test_prices_come_from_the_retail_api_linux_pay_as_you_go_and_are_remembered(
    retail_prices: tuple[str, list[dict[str, list[str]]]],
) -> None:
    url, queries = retail_prices
    book = PriceBook(url, {"Standard_NC24ads_A100_v4": 9.99})
    price = book.hourly("Standard_NC24ads_A100_v4", "eastus")
    assert price is not None and price.usd_per_hour == 3.673 and "Retail Prices API, eastus" in price.source
    first = queries[0]
    assert first["currencyCode"] == ["USD"] and first["api-version"] == ["2023-01-01-preview"]
    assert first["$filter"] == ["serviceName eq 'Virtual Machines' and armRegionName eq 'eastus' and "
                                "armSkuName eq 'Standard_NC24ads_A100_v4' and priceType eq 'Consumption'"]  # fmt: skip
    assert len(queries) == 2  # both pages
    assert book.hourly("Standard_NC24ads_A100_v4", "EastUS") == price and len(queries) == 2  # remembered


def test_without_the_api_the_settings_table_prices_and_says_so(
    retail_prices: tuple[str, list[dict[str, list[str]]]],
) -> None:
    url, _ = retail_prices
    unreachable = PriceBook("http://127.0.0.1:9/api/retail/prices", {"standard_nc24ads_a100_v4": 3.5}, timeout_s=2)
    fallback = unreachable.hourly("Standard_NC24ads_A100_v4", "eastus")
    assert fallback is not None and fallback.usd_per_hour == 3.5 and fallback.source == "VM_PRICES_USD_PER_HOUR setting"
    assert PriceBook(None, {}).hourly("Standard_NC24ads_A100_v4", "eastus") is None
    # The API knows no price for a size: the table's, else none.
    assert PriceBook(url, {}).hourly("Standard_NC24ads_A100_v4", "eastus") is not None


def test_an_api_that_did_not_answer_is_not_asked_again_for_a_while() -> None:
    asked: list[str] = []

    class Broken(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        book = PriceBook(f"http://127.0.0.1:{server.server_address[1]}/prices", {"Standard_NC24ads_A100_v4": 3.5})
        for _ in range(3):
            price = book.hourly("Standard_NC24ads_A100_v4", "eastus")
            assert price is not None and price.source == "VM_PRICES_USD_PER_HOUR setting"
        assert len(asked) == 1
    finally:
        server.shutdown()


def test_price_settings_read_and_refuse_clearly() -> None:
    settings = load_settings({"VM_PRICES_USD_PER_HOUR": "Standard_X=1.5, Standard_Y=2", "PRICES_API_URL": "off",
                              "MAX_TRAINING_COST_USD": "25"})  # fmt: skip
    assert settings.prices.api_url is None and dict(settings.prices.table) == {"Standard_X": 1.5, "Standard_Y": 2.0}
    assert settings.dataset.max_training_cost_usd == 25
    with pytest.raises(ValueError, match="VM_PRICES_USD_PER_HOUR"):
        load_settings({"VM_PRICES_USD_PER_HOUR": "Standard_X"})
    with pytest.raises(ValueError, match="MAX_TRAINING_COST_USD"):
        load_settings({"MAX_TRAINING_COST_USD": "-1"})


def _prepared(tmp_path: Path, metadata: dict[str, str] | None = None, budget: float = 0) -> Preparation:
    """An accepted upload prepared as intake prepares it, under a budget of `budget` dollars."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    sample = write_sample(tmp_path / "sample.jsonl", 60, seed=5)
    with sample.open("rb") as data:
        preparation = prepare_dataset(file_chunks(data), tmp_path / "prepared", InputInfo(sample.name),
                                      DatasetSettings(max_training_cost_usd=budget), metadata)  # fmt: skip
    assert preparation.accepted
    return preparation


def test_exact_token_counts_are_the_tokenizers_over_the_split(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from shared.backends.local.tiny_model import build_tiny_phi3
    from shared.datasets.tokens import count_tokens

    preparation = _prepared(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_phi3(tmp_path / "tiny-phi3"))
    lengths = {}
    for name in (TRAIN_FILE, TEST_FILE):
        lines = (preparation.out_dir / name).read_text().splitlines()
        rendered = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True)
                    for line in lines]  # fmt: skip
        lengths[name] = [len(ids["input_ids"]) for ids in rendered]
    tokens, training = count_tokens(preparation.out_dir / TRAIN_FILE, preparation.out_dir / TEST_FILE, tokenizer,
                                    "tiny-phi3", max_seq_length=64, epochs=2)  # fmt: skip
    everything = lengths[TRAIN_FILE] + lengths[TEST_FILE]
    assert tokens["total"] == sum(everything) and tokens["max"] == max(everything)
    assert tokens["over_max_seq_length"] == sum(length > 64 for length in everything) > 0
    assert tokens["method"] == "exact: the tiny-phi3 tokenizer and chat template"
    assert training == {"per_epoch": sum(min(n, 64) for n in lengths[TRAIN_FILE]), "epochs": 2,
                        "total": 2 * sum(min(n, 64) for n in lengths[TRAIN_FILE])}  # fmt: skip
    estimated = preparation.report["statistics"]["tokens"]
    assert estimated["method"].startswith("estimate:") and estimated["total"] != tokens["total"]


@pytest.fixture
def fake() -> FakeAzureML:
    return FakeAzureML()


def _azureml(fake: FakeAzureML, **env: str) -> AzureMLBackend:
    table = "Standard_NC24ads_A100_v4=4.0"
    return AzureMLBackend(load_settings({**WORKSPACE_ENV, "VM_PRICES_USD_PER_HOUR": table, **env}), transport=fake,
                          credential=FakeCredential())  # fmt: skip


def test_the_estimate_rests_on_the_cluster_the_model_and_the_price(fake: FakeAzureML, tmp_path: Path) -> None:
    preparation = _prepared(tmp_path)
    verdict = check_before_spending(_azureml(fake), preparation)
    assert verdict.refusal is None and verdict.estimate is not None
    estimate, basis = verdict.estimate, verdict.estimate.basis
    assert basis["vm_size"] == "Standard_NC24ads_A100_v4" and basis["gpus"] == 1 and basis["model_billions"] == 14.7
    tokens = preparation.report["statistics"]["training_tokens"]["total"]
    assert basis["training_tokens"] == tokens
    # Phi-4 (14.7B) is past the 14.2B row of the throughput table: its rate scaled by size.
    assert basis["tokens_per_second"] == round(1950 * 14.2 / 14.7)
    assert estimate.training_hours == pytest.approx(tokens / (1950 * 14.2 / 14.7) / 3600 + 0.5, rel=1e-6)
    assert estimate.training_usd == pytest.approx(estimate.training_hours * 4.0)
    assert estimate.hosting_usd_per_hour == 4.0 and basis["hosting_price_source"] == "VM_PRICES_USD_PER_HOUR setting"
    # Unused, an endpoint lives ENDPOINT_IDLE_MINUTES (60) and at most one janitor interval (10).
    assert basis["hosting_hours_until_teardown"] == pytest.approx(70 / 60, abs=1e-3)
    assert estimate.hosting_usd_until_teardown == pytest.approx(4.0 * 70 / 60)
    assert preparation.report["estimate"] == estimate.as_dict()
    assert preparation.report["statistics"]["tokens"]["method"].startswith("estimate:")  # no tokenizer in Azure
    assert not fake.sent("PUT", "")  # nothing created


def test_the_budget_refuses_with_the_estimate_and_allows_within_it(fake: FakeAzureML, tmp_path: Path) -> None:
    tight = check_before_spending(_azureml(fake), _prepared(tmp_path / "a", budget=0.5))
    assert tight.refusal and tight.estimate and tight.estimate.training_usd
    assert f"${tight.estimate.training_usd:.2f}" in tight.refusal and "over the budget of $0.5" in tight.refusal
    # The upload's own budget (metadata max_cost_usd) overrides MAX_TRAINING_COST_USD.
    loose = _prepared(tmp_path / "b", metadata={"max_cost_usd": "100"}, budget=0.5)
    assert check_before_spending(_azureml(fake), loose).refusal is None
    unpriced = _azureml(fake, VM_PRICES_USD_PER_HOUR="Standard_X=1")
    unknown = check_before_spending(unpriced, _prepared(tmp_path / "c", budget=5))
    assert unknown.refusal and "cannot be estimated" in unknown.refusal and "no price known" in unknown.refusal
    assert check_before_spending(unpriced, _prepared(tmp_path / "d")).refusal is None  # no budget: no refusal
    assert budget_refusal(Estimate(1.0, 3.0), 0) is None


def test_a_cluster_short_of_quota_is_refused_before_any_job(fake: FakeAzureML) -> None:
    fake.quota = {"standardNCADSA100v4Family": (12, 24)}
    request = JobRequest("ft-quota", "azureml://datastores/finetune_prepared/paths/run-1", "chats")
    with pytest.raises(PreflightError) as refused:
        _azureml(fake).submit(request)
    assert str(refused.value) == (
        "not enough Azure ML quota in eastus for the fine-tune: Standard_NC24ads_A100_v4 needs 24 vCPUs of "
        "standardNCADSA100v4Family, and Standard NCADSA100v4 Family Cluster Dedicated vCPUs has 12 free (12 of 24 "
        "in use); request more (Azure portal, Quotas, Machine learning) or choose another size or region"
    )
    assert not fake.sent("PUT", "/jobs/")
    fake.quota, fake.total_quota = {"standardNCADSA100v4Family": (0, 24)}, (190, 200)  # the regional total binds
    with pytest.raises(PreflightError, match="Total Cluster Dedicated Regional vCPUs has 10 free"):
        _azureml(fake).submit(request)
    fake.total_quota = (0, 200)
    assert _azureml(fake).submit(request).job_name == "ft-quota"


def test_a_deployment_short_of_quota_is_refused_before_its_endpoint(fake: FakeAzureML) -> None:
    from tests.test_azureml_backend import REQUEST, _completed_job

    model = _completed_job(fake).register(REQUEST.job_name)
    fake.quota = {"standardNCADSA100v4Family": (1, 24)}  # the A100 sizes skip the 20% reservation: 24 needed
    with pytest.raises(PreflightError, match="for the endpoint's deployment: Standard_NC24ads_A100_v4 needs 24 vCPUs"):
        _azureml(fake).deploy(model, "ep-quota", "main", {})
    assert not fake.sent("PUT", "/onlineEndpoints/")
    fake.quota = {"standardNCADSA100v4Family": (0, 24)}
    _azureml(fake).deploy(model, "ep-quota", "main", {})
    assert fake.sent("PUT", "/onlineEndpoints/ep-quota")


def test_managed_deployments_reserve_a_fifth_more_except_on_exempt_sizes() -> None:
    assert deployment_need("Standard_DS3_v2", 4, instances=1) == 8  # ceil(1.2 * 1) * 4
    assert deployment_need("Standard_DS3_v2", 4, instances=3) == 16  # ceil(3.6) * 4
    assert deployment_need("Standard_NC24ads_A100_v4", 24, instances=2) == 48


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "PYTHONPATH": str(REPO), **env})  # fmt: skip


def test_prepare_counts_exactly_with_a_tokenizer_it_is_given(tmp_path: Path) -> None:
    from shared.backends.local.tiny_model import build_tiny_phi3

    tokenizer = build_tiny_phi3(tmp_path / "tiny-phi3")
    data = write_sample(tmp_path / "data.jsonl", 40, seed=3)
    counted = _cli("prepare", str(data), "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer))
    assert counted.returncode == 0, counted.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["statistics"]["tokens"]["method"] == "exact: the tiny-phi3 tokenizer and chat template"
    missing = _cli("prepare", str(data), "--out", str(tmp_path / "out2"), "--tokenizer", "nobody/no-such-model",
                   HF_HUB_OFFLINE="1")  # fmt: skip
    assert missing.returncode == 1 and "--tokenizer nobody/no-such-model: cannot load it here" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_the_dry_run_prints_the_estimate_and_the_checks_beside_the_body(tmp_path: Path) -> None:
    preparation = _prepared(tmp_path / "chats")
    env = {**WORKSPACE_ENV, "AZUREML_GPUS_PER_NODE": "1", "AZURE_CLIENT_ID": "", "HTTPS_PROXY": "http://127.0.0.1:9",
           "MAX_TRAINING_COST_USD": "0.25", "VM_PRICES_USD_PER_HOUR": "Standard_NC24ads_A100_v4=4"}  # fmt: skip
    result = _cli("submit", "--backend", "azureml", "--dry-run", "--prepared", str(preparation.out_dir),
                  "--vm-size", "Standard_NC24ads_A100_v4", **env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["properties"]["jobType"] == "Pipeline"
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in result.stderr.splitlines() if ":" in line}
    estimate = json.loads(lines["estimate"])
    assert estimate["basis"]["vm_size"] == "Standard_NC24ads_A100_v4" and estimate["training_usd"] > 0.25
    assert (
        lines["check budget"].startswith("the estimated training cost")
        and "over the budget of $0.25" in lines["check budget"]
    )
    assert lines["check quota"].startswith("not checked")
