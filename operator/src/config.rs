//! Operator-wide settings that are not part of any one ModelDeployment.

use std::collections::BTreeMap;

use crate::validate::Accelerator;

/// Price of one replica per hour, by accelerator: `cpu`, an `nvidia.com/gpu.product`
/// value (per GPU), or `nvidia` as the fallback for GPU products not listed.
#[derive(Clone, Debug, PartialEq)]
pub struct PriceTable(BTreeMap<String, f64>);

impl PriceTable {
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, f64)>) -> Self {
        Self(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// Parses `cpu=0.10,nvidia=2.00,NVIDIA-H100-80GB-HBM3=4.00`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut table = BTreeMap::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("price entry {pair:?} is not KEY=PRICE"))?;
            let price: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|p: &f64| p.is_finite() && *p >= 0.0)
                .ok_or_else(|| format!("price of {k:?} is not a non-negative number: {v:?}"))?;
            table.insert(k.trim().to_owned(), price);
        }
        Ok(Self(table))
    }

    /// Price of one replica of a variant on `accelerator` (GPU prices are per GPU; the
    /// first listed product that has a price sets it).
    pub fn replica_price(&self, accelerator: &Accelerator) -> f64 {
        match accelerator {
            Accelerator::Cpu => self.0.get("cpu").copied().unwrap_or(0.0),
            Accelerator::Nvidia {
                count, products, ..
            } => {
                let per_gpu = products
                    .iter()
                    .find_map(|p| self.0.get(p))
                    .or_else(|| self.0.get("nvidia"))
                    .copied()
                    .unwrap_or(0.0);
                per_gpu * f64::from(*count)
            }
        }
    }
}

impl Default for PriceTable {
    fn default() -> Self {
        Self::from_pairs([("cpu", 0.10), ("nvidia", 2.50)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag_and_refuses_nonsense_with_the_entry() {
        let t = PriceTable::parse("cpu=0.1, NVIDIA-L4=0.8").unwrap();
        assert_eq!(t.replica_price(&Accelerator::Cpu), 0.1);
        assert_eq!(
            PriceTable::parse("cpu").unwrap_err(),
            "price entry \"cpu\" is not KEY=PRICE"
        );
        assert_eq!(
            PriceTable::parse("cpu=-1").unwrap_err(),
            "price of \"cpu\" is not a non-negative number: \"-1\""
        );
    }

    #[test]
    fn gpu_price_is_per_gpu_and_falls_back_to_nvidia() {
        let t = PriceTable::from_pairs([("nvidia", 2.0), ("NVIDIA-L4", 0.8)]);
        let l4 = Accelerator::Nvidia {
            count: 2,
            products: vec!["NVIDIA-L4".into()],
            mig_profile: None,
        };
        let other = Accelerator::Nvidia {
            count: 1,
            products: vec!["X".into()],
            mig_profile: None,
        };
        assert_eq!(t.replica_price(&l4), 1.6);
        assert_eq!(t.replica_price(&other), 2.0);
    }
}
