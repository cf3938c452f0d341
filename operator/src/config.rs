//! Operator-wide settings that are not part of any one ModelDeployment.

use std::collections::BTreeMap;

use crate::validate::Accelerator;

/// Price of one replica per hour, by accelerator: `cpu`, an `nvidia.com/gpu.product`
/// value (per GPU), `mig-<profile>` (per MIG slice, e.g. `mig-1g.10gb`), or `nvidia`
/// as the fallback for GPU products not listed.
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
    /// first listed product that has a price sets it; a MIG slice's own price, where the
    /// table has one, comes first: a slice is not a whole GPU).
    pub fn replica_price(&self, accelerator: &Accelerator) -> f64 {
        match accelerator {
            Accelerator::Cpu => self.0.get("cpu").copied().unwrap_or(0.0),
            Accelerator::Nvidia {
                count,
                products,
                mig_profile,
            } => {
                let per_gpu = mig_profile
                    .as_ref()
                    .and_then(|m| self.0.get(&format!("mig-{m}")))
                    .or_else(|| products.iter().find_map(|p| self.0.get(p)))
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

    #[test]
    fn the_preferred_product_with_a_price_sets_it_and_a_mig_slice_has_its_own() {
        let t =
            PriceTable::parse("nvidia=2.5,NVIDIA-H100-80GB-HBM3=4,NVIDIA-L4=0.8,mig-1g.10gb=0.6")
                .unwrap();
        let gpu = |products: &[&str], mig: Option<&str>| Accelerator::Nvidia {
            count: 1,
            products: products.iter().map(|p| p.to_string()).collect(),
            mig_profile: mig.map(str::to_owned),
        };
        let (h100, l4) = ("NVIDIA-H100-80GB-HBM3", "NVIDIA-L4");
        assert_eq!(t.replica_price(&gpu(&[h100, l4], None)), 4.0);
        assert_eq!(t.replica_price(&gpu(&[l4, h100], None)), 0.8);
        assert_eq!(t.replica_price(&gpu(&["NVIDIA-B200", l4], None)), 0.8);
        assert_eq!(t.replica_price(&gpu(&[h100], Some("1g.10gb"))), 0.6);
        // No price for this slice: the GPU's.
        assert_eq!(t.replica_price(&gpu(&[h100], Some("3g.40gb"))), 4.0);
    }
}
