//! Writes the seed inputs of every fuzz target to `DIR/<target>/seed-*`
//! (default `fuzz/corpus`), from the real encoders.

fn main() -> std::io::Result<()> {
    let root = std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into());
    for seed in cellpay_fuzzing::seeds::seeds() {
        let dir = std::path::Path::new(&root).join(seed.target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(&seed.name), &seed.bytes)?;
    }
    println!("seeds written under {root}");
    Ok(())
}
