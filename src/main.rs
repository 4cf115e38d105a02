/// Counts heap bytes in use for `bench step --profile` on the CPU (see `dms_retrofit::heap`).
#[global_allocator]
static ALLOCATOR: dms_retrofit::heap::Counting = dms_retrofit::heap::Counting;

fn main() -> std::process::ExitCode {
    dms_retrofit::cli::main()
}
