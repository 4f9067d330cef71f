//! Prints the ModelDeployment CRD as YAML (`crds/modeldeployment.yaml` is this output), or with
//! `--reference` the field reference in Markdown (`docs/reference.md`).

use kube::CustomResourceExt;

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--reference") {
        let crd = serde_json::to_value(kiln_operator::crd::ModelDeployment::crd())?;
        print!("{}", kiln_operator::reference::reference_markdown(&crd));
    } else {
        print!("{}", kiln_operator::crd::crd_yaml()?);
    }
    Ok(())
}
