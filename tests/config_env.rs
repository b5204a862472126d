//! `RELAY_…` environment variables, one fixture per case under `tests/config/env/`: the
//! variables of a case, and on a `# expect:` line either `ok` or `error: TEXT` (a part of the
//! message, which must name the variable).

use std::path::Path;

struct Case {
    vars: Vec<(String, String)>,
    expect: Result<(), String>,
}

fn parse(text: &str) -> Case {
    let mut vars = Vec::new();
    let mut expect = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# expect:") {
            let rest = rest.trim();
            expect = Some(match rest.strip_prefix("error:") {
                Some(text) => Err(text.trim().to_owned()),
                None => {
                    assert_eq!(rest, "ok", "an expectation is `ok` or `error: TEXT`");
                    Ok(())
                }
            });
        } else if !line.starts_with('#') {
            let (k, v) = line.split_once('=').expect("NAME=value");
            vars.push((k.to_owned(), v.to_owned()));
        }
    }
    Case {
        vars,
        expect: expect.expect("a `# expect:` line"),
    }
}

#[test]
fn every_environment_fixture_loads_or_fails_as_it_says() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/env");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("env") {
            continue;
        }
        seen += 1;
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let case = parse(&std::fs::read_to_string(&path).unwrap());
        let got = relay::config::load(None, case.vars.clone(), &[]);
        match (&case.expect, got) {
            (Ok(()), Ok(_)) => {}
            (Ok(()), Err(e)) => panic!("{name}: expected to load, got: {e}"),
            (Err(want), Ok(_)) => panic!("{name}: expected an error containing {want:?}, it loaded"),
            (Err(want), Err(e)) => {
                let e = e.to_string();
                assert!(e.contains(want.as_str()), "{name}: expected {want:?} in: {e}");
            }
        }
        // What is ignored is exactly what is neither a setting nor reserved.
        for var in relay::config::ignored_env(case.vars.clone()) {
            assert_eq!(
                relay::config::classify_env(&var),
                relay::config::EnvVar::Unrelated,
                "{name}: {var}"
            );
        }
    }
    assert!(seen >= 8, "fixtures found in {}: {seen}", dir.display());
}
