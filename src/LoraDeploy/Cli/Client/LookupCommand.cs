using System.CommandLine;
using System.Security.Cryptography;
using System.Text.Json;
using Spectre.Console;

namespace LoraDeploy.Cli.Client;

/// <summary><c>loradeploy lookup FILE|SHA256</c>: which CivitAI version a file in hand is, and the create command that deploys it.</summary>
internal static class LookupCommand
{
    public static Command Create()
    {
        var common = new CommonOptions();
        var target = new Argument<string>("FILE|SHA256") { Description = "A local .safetensors file (hashed here) or its SHA-256 (64 hex digits)." };
        var command = new Command("lookup", "Find the CivitAI version a file belongs to (by its SHA-256) and print the create command that deploys it.");
        command.Arguments.Add(target);
        common.AddTo(command);

        command.SetAction(DeployCommands.Run(common, async (r, ctx, client, output, ct) =>
        {
            var sha256 = await Sha256Of(r.GetValue(target) ?? "", ct).ConfigureAwait(false);
            ApiResponse found;
            try
            {
                found = await client.GetAsync($"v1/lora/civitai/by-hash/{sha256}", ct).ConfigureAwait(false);
            }
            catch (ClientException ex) when (ex.StatusCode == 404)
            {
                throw new ClientException($"CivitAI knows no published file with SHA-256 {sha256}", ExitCodes.ServerError, 404);
            }
            if (ctx.Json)
            {
                output.Out.WriteLine(found.Text.Trim());
                return ExitCodes.Ok;
            }
            Print(found.Json, output);
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static async Task<string> Sha256Of(string target, CancellationToken ct)
    {
        target = target.Trim();
        if (File.Exists(target))
        {
            await using var stream = File.OpenRead(target);
            return Convert.ToHexStringLower(await SHA256.HashDataAsync(stream, ct).ConfigureAwait(false));
        }
        if (target.Length == 64 && target.All(char.IsAsciiHexDigit))
        {
            return target.ToLowerInvariant();
        }
        throw new ClientException($"'{target}' is neither a file nor a SHA-256 (64 hex digits)", ExitCodes.Usage);
    }

    private static void Print(JsonElement found, ClientOutput output)
    {
        void Field(string label, string value)
        {
            if (value.Length > 0)
            {
                output.Markup($"  [grey]{label,-12}[/] {Markup.Escape(value)}");
            }
        }

        output.Markup($"[bold]{Markup.Escape(found.Str("model_name"))}[/] {Markup.Escape(found.Str("version_name"))} [grey](CivitAI model {found.Str("model_id")}, version {found.Str("version_id")})[/]");
        Field("file", $"{found.Str("file_name")} (file {found.Str("file_id")})");
        Field("type", found.Str("model_type"));
        Field("base model", $"{found.Str("base_model")} (on CivitAI)");
        Field("triggers", string.Join(", ", found.Strings("trained_words")));
        DeployCommands.PrintLicense(found, Field);
        var name = SuggestedName(found.Str("file_name"));
        if (found.Str("policy_refusal") is { Length: > 0 } refusal)
        {
            output.Markup($"  [red]policy[/]       {Markup.Escape(refusal)}");
        }
        output.Markup("deploy it with (pick --base from `loradeploy` base models matching the CivitAI base model):");
        output.Out.WriteLine($"  loradeploy create --civitai '{found.Str("civit_url")}' --name {name} --base MODEL");
    }

    /// <summary>The file name as a valid LoRA name (<see cref="Loras.LoraNames"/>).</summary>
    private static string SuggestedName(string fileName)
    {
        var stem = Path.GetFileNameWithoutExtension(fileName);
        var cleaned = new string(stem.Select(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-' ? c : '-').ToArray()).Trim('-', '.', '_');
        if (cleaned.Length > Loras.LoraNames.MaxLength)
        {
            cleaned = cleaned[..Loras.LoraNames.MaxLength];
        }
        return Loras.LoraNames.IsValid(cleaned) ? cleaned : "my-lora";
    }
}
