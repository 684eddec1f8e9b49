//! Per-token prices (per million tokens: input, cached input, output, per model) and the
//! per-token bill of a request, to set beside its energy bill.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// One model's prices per million tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPrices {
    pub input: Decimal,
    /// Prompt tokens served from a cache; the input price when not given.
    pub cached_input: Option<Decimal>,
    pub output: Decimal,
}

/// A price table, e.g. a provider's list (TOML: `currency`, `[models."name"]`, `[default]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenTable {
    /// Must be the tariff's.
    pub currency: Option<String>,
    pub models: BTreeMap<String, TokenPrices>,
    /// For models the table does not list.
    pub default: Option<TokenPrices>,
}

impl TokenTable {
    /// Reads a TOML table.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The prices for `model`.
    pub fn prices(&self, model: Option<&str>) -> Option<&TokenPrices> {
        model
            .and_then(|m| self.models.get(m))
            .or(self.default.as_ref())
    }

    /// What a request with these token counts costs per token; `None` without prices for its
    /// model or without counts.
    pub fn cost(
        &self,
        model: Option<&str>,
        prompt: Option<u64>,
        cached: Option<u64>,
        completion: Option<u64>,
    ) -> Option<Decimal> {
        let p = self.prices(model)?;
        // Embeddings report prompt tokens only: no output is no output.
        let prompt = prompt?;
        let completion = completion.unwrap_or(0);
        let cached = cached.unwrap_or(0).min(prompt);
        let million = Decimal::from(1_000_000u32);
        Some(
            (Decimal::from(prompt - cached) * p.input
                + Decimal::from(cached) * p.cached_input.unwrap_or(p.input)
                + Decimal::from(completion) * p.output)
                / million,
        )
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;

    #[test]
    fn cached_tokens_are_priced_apart_and_unknown_models_use_the_default() {
        let t: TokenTable = toml::from_str(
            "currency = \"USD\"\n[models.\"qwen-72b\"]\ninput = \"0.90\"\ncached_input = \"0.09\"\noutput = \"1.80\"\n[default]\ninput = 0.5\noutput = 1.5\n",
        )
        .expect("table");
        // 1,000 prompt tokens of which 600 cached, 200 output.
        let c = t
            .cost(Some("qwen-72b"), Some(1000), Some(600), Some(200))
            .expect("priced");
        assert_eq!(c, dec!(0.000774));
        assert_eq!(
            t.cost(Some("other"), Some(1000), None, Some(0)),
            Some(dec!(0.0005))
        );
        assert_eq!(t.cost(Some("qwen-72b"), None, None, Some(3)), None);
        // An embedding: prompt tokens only.
        assert_eq!(
            t.cost(Some("qwen-72b"), Some(1000), None, None),
            Some(dec!(0.0009))
        );
        assert!(toml::from_str::<TokenTable>("[models.x]\ninput = 1\n").is_err());
    }
}
