//! `iris-features`: lets clients send iris flowers by name instead of as a bare tensor, and
//! answers with the class name beside the probabilities.
//!
//! Preprocess accepts an input `features` that is either BYTES, one JSON object per flower
//! (`{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}`),
//! or FP32 `[n, 4]` in that order; every value is checked against its range, and the model's
//! input tensor is built from them. Postprocess adds a BYTES output `label` with the most
//! probable class per row.
//!
//! ```toml
//! [[endpoints.iris.processors]]
//! plugin = "iris-features"
//! config = { labels = ["setosa", "versicolor", "virginica"] }   # all keys optional
//! ```

use std::collections::BTreeMap;

use modelyard_sdk::{DataType, Error, Processor, RequestContext, Tensor, fail};

pub const FEATURES: [&str; 4] = ["sepal_length", "sepal_width", "petal_length", "petal_width"];

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The client's input.
    pub input: String,
    /// The model's input it becomes.
    pub model_input: String,
    /// The model's output of class probabilities.
    pub probabilities: String,
    /// Class names, in the model's output order.
    pub labels: Vec<String>,
    /// Accepted range per feature, in centimetres.
    pub ranges: BTreeMap<String, [f32; 2]>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            input: "features".into(),
            model_input: "input".into(),
            probabilities: "probabilities".into(),
            labels: ["setosa", "versicolor", "virginica"]
                .map(String::from)
                .into(),
            // Generous bounds around what the training data saw (4.3-7.9, 2.0-4.4,
            // 1.0-6.9, 0.1-2.5): flowers, not typos.
            ranges: FEATURES
                .iter()
                .zip([[1.0, 15.0], [0.5, 10.0], [0.1, 15.0], [0.01, 6.0]])
                .map(|(n, r)| (n.to_string(), r))
                .collect(),
        }
    }
}

pub struct IrisFeatures {
    config: Config,
    ranges: [[f32; 2]; 4],
}

impl Processor for IrisFeatures {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        if let Some(unknown) = config
            .ranges
            .keys()
            .find(|k| !FEATURES.contains(&k.as_str()))
        {
            return fail!(
                "unknown feature '{unknown}' in ranges; the features are {}",
                FEATURES.join(", ")
            );
        }
        let defaults = Config::default().ranges;
        let mut ranges = [[0.0; 2]; 4];
        for (slot, name) in ranges.iter_mut().zip(FEATURES) {
            *slot = config
                .ranges
                .get(name)
                .or(defaults.get(name))
                .copied()
                .unwrap_or([f32::MIN, f32::MAX]);
            if slot[0] > slot[1] {
                return fail!("range of {name} is empty: {:?}", slot);
            }
        }
        if config.labels.is_empty() {
            return fail!("labels must name at least one class");
        }
        Ok(IrisFeatures { config, ranges })
    }

    fn preprocess(&self, _ctx: &RequestContext, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let mut rest = Vec::with_capacity(inputs.len());
        let mut rows: Option<Vec<[f32; 4]>> = None;
        for input in inputs {
            if input.name != self.config.input {
                rest.push(input);
                continue;
            }
            rows = Some(match input.datatype {
                DataType::Bytes => input
                    .as_strings()?
                    .iter()
                    .enumerate()
                    .map(|(i, s)| parse_row(i, s))
                    .collect::<Result<_, _>>()?,
                DataType::Fp32 => {
                    input.expect_shape(&[None, Some(4)])?;
                    input
                        .as_f32()?
                        .chunks_exact(4)
                        .map(|c| [c[0], c[1], c[2], c[3]])
                        .collect()
                }
                other => {
                    return fail!(
                        "input '{}' is {other}; send BYTES (JSON objects) or FP32 [n, 4]",
                        input.name
                    );
                }
            });
        }
        let Some(rows) = rows else {
            return fail!(
                "input '{}' is missing: send the flowers' features there",
                self.config.input
            );
        };
        for (i, row) in rows.iter().enumerate() {
            for ((value, [lo, hi]), name) in row.iter().zip(self.ranges).zip(FEATURES) {
                if !(lo..=hi).contains(value) {
                    return fail!("flower {i}: {name} = {value} is outside {lo}..{hi} cm");
                }
            }
        }
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        rest.push(Tensor::from_f32(
            &self.config.model_input,
            &[rows.len() as u64, 4],
            &flat,
        )?);
        Ok(rest)
    }

    fn postprocess(
        &self,
        _ctx: &RequestContext,
        mut outputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, Error> {
        let Some(probabilities) = outputs.iter().find(|t| t.name == self.config.probabilities)
        else {
            return fail!("the model gave no output '{}'", self.config.probabilities);
        };
        let classes = self.config.labels.len();
        probabilities.expect_shape(&[None, Some(classes as u64)])?;
        let labels: Vec<&str> = probabilities
            .as_f32()?
            .chunks_exact(classes)
            .map(|row| {
                let best = (0..classes)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap_or(0);
                self.config.labels[best].as_str()
            })
            .collect();
        outputs.push(Tensor::from_strings(
            "label",
            &[labels.len() as u64],
            &labels,
        )?);
        Ok(outputs)
    }
}

modelyard_sdk::register!(processor: IrisFeatures);

fn parse_row(i: usize, text: &str) -> Result<[f32; 4], Error> {
    let object: BTreeMap<String, f32> = serde_json::from_str(text)
        .map_err(|e| Error::new(format!("flower {i}: not a JSON object of numbers ({e})")))?;
    if let Some(unknown) = object.keys().find(|k| !FEATURES.contains(&k.as_str())) {
        return fail!(
            "flower {i}: unknown feature '{unknown}'; the features are {}",
            FEATURES.join(", ")
        );
    }
    let mut row = [0.0; 4];
    for (slot, name) in row.iter_mut().zip(FEATURES) {
        *slot = *object
            .get(name)
            .ok_or_else(|| Error::new(format!("flower {i}: {name} is missing")))?;
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> IrisFeatures {
        IrisFeatures::new(Config::default()).unwrap()
    }

    #[test]
    fn named_features_become_the_model_tensor() {
        let json =
            r#"{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}"#;
        let input = Tensor::from_strings("features", &[1], &[json]).unwrap();
        let out = plugin()
            .preprocess(&RequestContext::default(), vec![input])
            .unwrap();
        assert_eq!(
            out,
            vec![Tensor::from_f32("input", &[1, 4], &[5.1, 3.5, 1.4, 0.2]).unwrap()]
        );

        let vector = Tensor::from_f32("features", &[1, 4], &[5.1, 3.5, 1.4, 0.2]).unwrap();
        assert_eq!(
            plugin()
                .preprocess(&RequestContext::default(), vec![vector])
                .unwrap(),
            out
        );
    }

    #[test]
    fn bad_flowers_are_refused_with_the_reason() {
        let cases = [
            (
                r#"{"sepal_length": 51, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}"#,
                "sepal_length = 51 is outside",
            ),
            (
                r#"{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4}"#,
                "petal_width is missing",
            ),
            (
                r#"{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2, "colour": 1}"#,
                "unknown feature 'colour'",
            ),
            ("[1, 2, 3, 4]", "not a JSON object"),
        ];
        for (json, expected) in cases {
            let input = Tensor::from_strings("features", &[1], &[json]).unwrap();
            let err = plugin()
                .preprocess(&RequestContext::default(), vec![input])
                .unwrap_err();
            assert!(err.0.contains(expected), "{err} lacks {expected}");
        }
        let err = plugin()
            .preprocess(&RequestContext::default(), vec![])
            .unwrap_err();
        assert!(err.0.contains("input 'features' is missing"), "{err}");
    }

    #[test]
    fn postprocess_names_the_most_probable_class() {
        let probs =
            Tensor::from_f32("probabilities", &[2, 3], &[0.9, 0.05, 0.05, 0.1, 0.2, 0.7]).unwrap();
        let out = plugin()
            .postprocess(&RequestContext::default(), vec![probs.clone()])
            .unwrap();
        assert_eq!(out[0], probs);
        assert_eq!(out[1].name, "label");
        assert_eq!(out[1].as_strings().unwrap(), vec!["setosa", "virginica"]);
    }

    #[test]
    fn configs_are_checked() {
        let err = IrisFeatures::new(Config {
            ranges: [("colour".to_string(), [0.0, 1.0])].into(),
            ..Config::default()
        })
        .err()
        .unwrap();
        assert!(err.0.contains("unknown feature 'colour'"));
        assert!(
            IrisFeatures::new(Config {
                labels: vec![],
                ..Config::default()
            })
            .is_err()
        );
    }
}
