//! Token ids and chat-template renderings against the Python `tokenizers` / transformers output
//! recorded by `scripts/make_tokenizer_goldens.py` for real tokenizer.json files.

mod common;

use std::path::PathBuf;

use dms_retrofit::data::{ChatTemplate, Tokenizer};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Deserialize)]
struct IdCase {
    text: String,
    add_special_tokens: bool,
    ids: Vec<u32>,
    decoded: Option<String>,
}

#[derive(Deserialize)]
struct IdGolden {
    cases: Vec<IdCase>,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<Value>,
    add_generation_prompt: bool,
    #[serde(default)]
    extra: Map<String, Value>,
    rendered: String,
}

#[derive(Deserialize)]
struct ChatGolden {
    cases: Vec<ChatCase>,
}

/// Fixture folders holding `file`. The Qwen3 tokenizer.json (11 MB) is not committed;
/// `.ci/run` fetches it (scripts/make_tokenizer_goldens.py --fetch-only).
fn tokenizer_dirs(file: &str) -> Vec<PathBuf> {
    let root = common::fixtures().join("tokenizers");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures/tokenizers exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join(file).is_file())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no tokenizer fixtures under {}",
        root.display()
    );
    dirs
}

#[test]
fn token_ids_match_python_tokenizers() {
    let mut checked = 0;
    for dir in tokenizer_dirs("tokenizer.json") {
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        let text = std::fs::read_to_string(dir.join("golden.json")).unwrap();
        let golden: IdGolden = serde_json::from_str(&text).unwrap();
        for case in golden.cases {
            let ids = tokenizer
                .encode(&case.text, case.add_special_tokens)
                .unwrap();
            assert_eq!(
                ids,
                case.ids,
                "{}: {:?} (special tokens {})",
                dir.display(),
                case.text,
                case.add_special_tokens
            );
            if let Some(decoded) = case.decoded {
                assert_eq!(
                    tokenizer.decode(&ids, false).unwrap(),
                    decoded,
                    "{:?}",
                    case.text
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} cases checked");
}

#[test]
fn chat_templates_render_like_transformers() {
    let mut checked = 0;
    for dir in tokenizer_dirs("chat_golden.json") {
        let golden_path = dir.join("chat_golden.json");
        let template =
            ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json")).unwrap();
        let golden: ChatGolden =
            serde_json::from_str(&std::fs::read_to_string(golden_path).unwrap()).unwrap();
        for case in golden.cases {
            let rendered = template
                .render(&case.messages, case.add_generation_prompt, &case.extra)
                .unwrap();
            assert_eq!(
                rendered,
                case.rendered,
                "{}: {:?}",
                dir.display(),
                case.messages
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} chat cases checked");
}
