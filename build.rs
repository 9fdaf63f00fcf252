// The migrations are embedded at compile time (`embed_migrations!`); rebuild when one is
// added or edited, not only when Rust code changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
