"""Hourly prices of Azure VM sizes: the Azure Retail Prices API (public, no key), remembered for a
day, with a price table from the settings when the API is off or cannot be reached.

Azure ML bills its compute clusters and managed online endpoints as the virtual machines they
run on, with no surcharge ("There's no additional charge to use Azure Machine Learning": the
Azure ML pricing page), so a VM size's pay-as-you-go Linux price is the hourly price of a node.
API: learn.microsoft.com/rest/api/cost-management/retail-prices/azure-retail-prices."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.settings import PriceSettings

log = logging.getLogger(__name__)

RETAIL_PRICES_URL = "https://prices.azure.com/api/retail/prices"
API_VERSION = "2023-01-01-preview"
CACHE_SECONDS = 24 * 3600
RETRY_SECONDS = 300  # after the API did not answer
MAX_PAGES = 5
# Meters that are not the pay-as-you-go Linux price of a VM size.
_NOT_PAY_AS_YOU_GO = ("spot", "low priority")


@dataclass(frozen=True)
class HourlyPrice:
    vm_size: str
    usd_per_hour: float
    source: str  # where the figure comes from, for the report


class PriceBook:
    """Prices by VM size and region. `api_url` None: the table only."""

    def __init__(self, api_url: str | None, table: dict[str, float], timeout_s: float = 10) -> None:
        self.api_url, self.timeout_s = api_url, timeout_s
        self.table = {size.lower(): price for size, price in table.items()}
        self._cache: dict[tuple[str, str], tuple[float, HourlyPrice | None]] = {}
        self._lock = threading.Lock()

    def hourly(self, vm_size: str, region: str | None) -> HourlyPrice | None:
        """The price of one node of `vm_size` in `region`, or None when nothing knows it."""
        if self.api_url and region:
            key = (vm_size.lower(), region.lower())
            with self._lock:
                cached = self._cache.get(key)
            if cached and time.monotonic() - cached[0] < CACHE_SECONDS:
                if cached[1]:
                    return cached[1]
            else:
                try:
                    found = self._ask_api(vm_size, region)
                except (OSError, ValueError, KeyError, TypeError) as error:
                    log.warning("the Retail Prices API did not answer for %s in %s (%s); using the price table",
                                vm_size, region, error)  # fmt: skip
                    with self._lock:  # not asked again for a few minutes: each try may wait out a timeout
                        self._cache[key] = (time.monotonic() - CACHE_SECONDS + RETRY_SECONDS, None)
                else:
                    with self._lock:
                        self._cache[key] = (time.monotonic(), found)
                    if found:
                        return found
        price = self.table.get(vm_size.lower())
        return HourlyPrice(vm_size, price, "VM_PRICES_USD_PER_HOUR setting") if price is not None else None

    def _ask_api(self, vm_size: str, region: str) -> HourlyPrice | None:
        assert self.api_url is not None
        query = (f"serviceName eq 'Virtual Machines' and armRegionName eq '{region.lower()}' "
                 f"and armSkuName eq '{vm_size}' and priceType eq 'Consumption'")  # fmt: skip
        url: str | None = (
            self.api_url
            + "?"
            + urllib.parse.urlencode({"api-version": API_VERSION, "currencyCode": "USD", "$filter": query})
        )
        prices = []
        for _ in range(MAX_PAGES):
            if not url:
                break
            page = _get_json(url, self.timeout_s)
            prices += [item["retailPrice"] for item in page.get("Items", []) if _pay_as_you_go_linux(item)]
            url = page.get("NextPageLink")
        if not prices:
            return None
        today = datetime.now(UTC).date().isoformat()
        return HourlyPrice(vm_size, float(min(prices)), f"Azure Retail Prices API, {region}, {today}")


@lru_cache(maxsize=4)
def _book(api_url: str | None, table: tuple[tuple[str, float], ...]) -> PriceBook:
    return PriceBook(api_url, dict(table))


def price_book(prices: PriceSettings) -> PriceBook:
    """One book per price settings, so the API is asked once a day per VM size and region."""
    return _book(prices.api_url, prices.table)


def _pay_as_you_go_linux(item: dict[str, Any]) -> bool:
    names = " ".join(str(item.get(field, "")) for field in ("skuName", "meterName", "productName")).lower()
    return (
        item.get("type") == "Consumption"
        and item.get("unitOfMeasure") == "1 Hour"
        and item.get("currencyCode", "USD") == "USD"
        and "windows" not in names
        and not any(word in names for word in _NOT_PAY_AS_YOU_GO)
    )


def _get_json(url: str, timeout_s: float) -> dict[str, Any]:
    import urllib.request  # only where prices are fetched: settings import this module at every start

    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())
