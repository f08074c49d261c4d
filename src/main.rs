fn main() {
    println!("keyway {}", env!("CARGO_PKG_VERSION"));
}
