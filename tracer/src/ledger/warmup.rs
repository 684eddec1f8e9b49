//! Units split while a service's cost model had not learned yet are split again once it has.
//!
//! The `tokens` split prices a unit's requests with what the model learned from the units
//! before it. At a service's start (and the daemon's) there are none: the first units are split
//! at the prior's prices (busy time free, a prefill token a tenth of a decode token), which
//! overcharges small prompts and undercharges large ones by tens of per cent in the first
//! seconds of a run. Such units are *held*: split at once (so every total stays conserved and
//! visible), remembered with each request's features, and split again at the prices the model
//! has once it has learned from [`CostModelConfig::warmup_units`] units — or, at the latest,
//! `max_defer_ns` after the unit. A request with held units is not final until they are
//! released, so its record waits for the re-split; its error bars keep the prior's wide
//! random split error for those units. The ledger stays pure: the re-split depends only on the
//! units that came before the release.
//!
//! [`CostModelConfig::warmup_units`]: super::CostModelConfig::warmup_units

use crate::ids::{DeviceId, RequestId, ServiceId};

use super::{
    config::LedgerConfig,
    features::Feat,
    pending::IdMap,
    state::Request,
    weights::{self, Prices, Weights},
};

/// One service's energy in one unit, split at a model that had not learned yet.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct HeldUnit {
    pub(super) service: ServiceId,
    /// When the unit ended.
    pub(super) end_ns: u64,
    pub(super) e_dyn: f64,
    pub(super) e_idle: f64,
    /// Its requests, their features, and the share each was given.
    pub(super) ids: Vec<RequestId>,
    pub(super) feats: Vec<Feat>,
    pub(super) shares: Vec<f64>,
}

/// Releases `unit`: splits it again at `prices` (none: as it was) and moves each request's
/// energy by the difference.
pub(super) fn resplit(
    dev_id: DeviceId,
    config: &LedgerConfig,
    unit: &HeldUnit,
    prices: Option<&Prices>,
    requests: &mut IdMap<Box<Request>>,
    scratch: &mut Weights,
) {
    let outcome = prices.map(|p| weights::weights(config.split, &unit.feats, p, scratch));
    let sum = outcome
        .filter(|o| o.used_model && o.sum > 0.0 && o.sum.is_finite())
        .map(|o| o.sum);
    for (k, id) in unit.ids.iter().enumerate() {
        let Some(r) = requests.get_mut(id) else {
            continue;
        };
        r.held_units = r.held_units.saturating_sub(1);
        let Some(sum) = sum else {
            continue;
        };
        let delta = scratch.w[k] / sum - unit.shares[k];
        let acc = r.accounts.entry(dev_id).or_default();
        acc.dynamic_j += delta * unit.e_dyn;
        acc.idle_j += delta * unit.e_idle;
        // The difference to the alternative split is measured from what it now gets.
        acc.split_diff_j -= delta * (unit.e_dyn + unit.e_idle);
        let f = &unit.feats[k];
        acc.share_ns += delta * (f.b - f.a) as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::types::Arrival;

    fn feat(cand: usize, time_s: f64, prefill: f64) -> Feat {
        Feat {
            cand,
            a: 0,
            b: 100_000_000,
            time_s,
            plain_s: 0.05,
            prefill,
            decode: 5.0,
            decode_ctx: 0.0,
            step_ctx: 0.0,
            chunks: (0, 0),
            pauses: (0, 0),
            tokens_known: true,
            bytes_rate: None,
        }
    }

    #[test]
    fn a_held_unit_is_split_again_at_the_learned_prices() {
        let config = LedgerConfig::default();
        let dev = DeviceId(0);
        let mut requests = IdMap::default();
        let ids = [RequestId(1), RequestId(2)];
        for id in ids {
            let mut r = Request::new(ServiceId(1), Arrival::default());
            r.held_units = 1;
            // At the prior both got half of 10 J dynamic and 2 J idle.
            let acc = r.accounts.entry(dev).or_default();
            acc.dynamic_j = 5.0;
            acc.idle_j = 1.0;
            requests.insert(id, Box::new(r));
        }
        let unit = HeldUnit {
            service: ServiceId(1),
            end_ns: 100_000_000,
            e_dyn: 10.0,
            e_idle: 2.0,
            ids: ids.to_vec(),
            // The second prefilled 300 tokens.
            feats: vec![feat(0, 0.05, 0.0), feat(1, 0.05, 300.0)],
            shares: vec![0.5, 0.5],
        };
        // Learned: 100 W busy, 0.01 J per prefill token, 0.02 J per decode token: costs 5.1 J
        // and 8.1 J, so shares 5.1 / 13.2 and 8.1 / 13.2.
        let prices = Prices {
            busy_w: 100.0,
            prefill_j_per_token: 0.01,
            decode_j_per_token: 0.02,
            decode_context_j_per_token: 0.0,
        };
        let mut scratch = Weights::default();
        resplit(
            dev,
            &config,
            &unit,
            Some(&prices),
            &mut requests,
            &mut scratch,
        );
        let got = |rs: &IdMap<Box<Request>>, i: usize| rs[&ids[i]].accounts[&dev];
        let (a, b) = (5.1 / 13.2, 8.1 / 13.2);
        assert!((got(&requests, 0).dynamic_j - 10.0 * a).abs() < 1e-9);
        assert!((got(&requests, 1).dynamic_j - 10.0 * b).abs() < 1e-9);
        assert!((got(&requests, 0).idle_j - 2.0 * a).abs() < 1e-9);
        // Nothing created or lost, and both are free to be emitted.
        let total: f64 = (0..2)
            .map(|i| got(&requests, i).dynamic_j + got(&requests, i).idle_j)
            .sum();
        assert!((total - 12.0).abs() < 1e-9);
        assert!(ids.iter().all(|id| requests[id].held_units == 0));

        // Released without prices (the service's model is gone): as it was, but released.
        requests.get_mut(&ids[0]).expect("request").held_units = 1;
        let before = got(&requests, 0).dynamic_j;
        let one = HeldUnit {
            ids: vec![ids[0]],
            feats: vec![feat(0, 0.05, 0.0)],
            shares: vec![1.0],
            ..unit
        };
        resplit(dev, &config, &one, None, &mut requests, &mut scratch);
        assert!((got(&requests, 0).dynamic_j - before).abs() < f64::EPSILON);
        assert_eq!(requests[&ids[0]].held_units, 0);
    }
}
