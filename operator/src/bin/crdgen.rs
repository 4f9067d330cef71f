//! Prints the ModelDeployment CRD as YAML; `crds/modeldeployment.yaml` is this output.

fn main() -> anyhow::Result<()> {
    print!("{}", kiln_operator::crd::crd_yaml()?);
    Ok(())
}
