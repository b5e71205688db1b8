//! `#[service]`: turns an `impl` block's `on_<method>` functions into a
//! commissaire-host plugin. See `commissaire-plugin-api` for the guide.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{
    Attribute, Expr, ExprLit, FnArg, GenericArgument, ImplItem, ImplItemFn, ItemImpl, Lit, LitStr,
    Meta, Pat, PathArguments, ReturnType, Type,
};

/// Exposes every `[async] fn on_<name>(&self, [msg: &Message,] args…) -> Result<T, E>`
/// of the `impl` block as bus method `<name>` of service `name`, and exports
/// the plugin's root module. Documented, with examples, in
/// `commissaire-plugin-api`, which re-exports it.
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

struct Param {
    ident: syn::Ident,
    ty: Type,
    optional: bool,
}

struct Method {
    bus_name: String,
    fn_ident: syn::Ident,
    doc: String,
    takes_msg: bool,
    /// An `async fn`.
    is_async: bool,
    params: Vec<Param>,
    returns: String,
    /// The declared return type, for spanning conversion errors.
    output: Type,
    /// The result type (the `Result`'s `Ok`), for the contract.
    ok: Type,
    /// Declared by `#[rpc_error(code, "message")]`.
    errors: Vec<(Expr, LitStr)>,
    /// Marked `#[notification]`.
    notification: bool,
}

fn expand(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let mut name: Option<LitStr> = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            name = Some(meta.value()?.parse()?);
            Ok(())
        } else {
            Err(meta.error("unknown argument; expected `name = \"…\"`"))
        }
    });
    syn::parse::Parser::parse2(parser, attr)?;
    let Some(name) = name else {
        return Err(syn::Error::new(
            Span::call_site(),
            "#[service] needs the bus name of the service: #[service(name = \"simple\")]",
        ));
    };
    if name.value().is_empty() || name.value().contains(['.', '*', '#', ' ']) {
        return Err(syn::Error::new(
            name.span(),
            "a service name must be non-empty and contain no `.`, `*`, `#` or spaces",
        ));
    }

    let mut block: ItemImpl = syn::parse2(item)?;
    elide_message_lifetimes(&mut block);
    if let Some((_, path, _)) = &block.trait_ {
        return Err(syn::Error::new(
            path.span(),
            "#[service] goes on an inherent `impl`, not a trait impl",
        ));
    }
    if !block.generics.params.is_empty() {
        return Err(syn::Error::new(
            block.generics.span(),
            "#[service] does not support generic service types",
        ));
    }
    let mut methods = Vec::new();
    let mut has_init = false;
    for item in &block.items {
        let ImplItem::Fn(f) = item else { continue };
        let ident = f.sig.ident.to_string();
        if ident == "init" {
            has_init = true;
        } else if let Some(bus_name) = ident.strip_prefix("on_") {
            methods.push(parse_method(f, bus_name)?);
        }
    }
    strip_contract_attributes(&mut block);
    let self_ty = &block.self_ty;
    if methods.is_empty() {
        return Err(syn::Error::new(
            self_ty.span(),
            "#[service] found no `fn on_<method>(&self, …)` to expose",
        ));
    }

    let construct = if has_init {
        quote!(Self::init(config).map_err(::commissaire_plugin_api::__private::into_rpc_error))
    } else {
        quote!({
            let _ = config;
            ::core::result::Result::Ok(<Self as ::core::default::Default>::default())
        })
    };

    // The body that decodes the params (`method`, `params` and `msg` in
    // scope), calls the handler and encodes its result; `.await`ed for an
    // async handler.
    let body = |m: &Method| {
        let fn_ident = &m.fn_ident;
        let names = m.params.iter().map(|p| p.ident.to_string());
        let gets = m.params.iter().enumerate().map(|(i, p)| {
            let ty = &p.ty;
            let pname = p.ident.to_string();
            let optional = p.optional;
            quote_spanned!(ty.span()=> __args.get::<#ty>(#i, #pname, #optional)?)
        });
        let msg_arg = m.takes_msg.then(|| quote!(msg,));
        let awaited = m.is_async.then(|| quote!(.await));
        // Spanned at the return type: an error type that does not convert
        // is reported there.
        let call = quote_spanned!(m.output.span()=>
            self.#fn_ident(#msg_arg #(#gets),*)#awaited
                .map_err(::commissaire_plugin_api::__private::into_rpc_error)
        );
        quote! {
            let __args = ::commissaire_plugin_api::__private::ParsedArgs::parse(
                method, params, &[#(#names),*],
            )?;
            let __result = #call?;
            ::commissaire_plugin_api::__private::encode_result(method, &__result)
        }
    };
    let arms = methods.iter().map(|m| {
        let bus_name = &m.bus_name;
        let body = body(m);
        if m.is_async {
            // A host older than plugin-api 1.5 calls it here and waits.
            quote! {
                #bus_name => ::commissaire_plugin_api::__private::block_on(
                    <Self as ::commissaire_plugin_api::__private::ServiceImpl>::NAME,
                    async { #body },
                ),
            }
        } else {
            quote! { #bus_name => { #body } }
        }
    });
    let async_methods: Vec<&Method> = methods.iter().filter(|m| m.is_async).collect();
    let async_names = async_methods.iter().map(|m| &m.bus_name);
    let async_arms = async_methods.iter().map(|m| {
        let bus_name = &m.bus_name;
        let body = body(m);
        let msg = m.takes_msg.then(|| quote!(let msg = &msg;));
        // Spanned at the handler: a future that is not `Send` (it holds an
        // `Rc` or a `MutexGuard` across an `.await`) is reported there.
        quote_spanned! {m.fn_ident.span()=>
            #bus_name => ::core::option::Option::Some(
                ::commissaire_plugin_api::__private::boxed(async move {
                    let method = #bus_name;
                    let params: &str = &params;
                    #msg
                    #body
                }),
            ),
        }
    });
    let async_entries = (!async_methods.is_empty()).then(|| {
        quote! {
            fn is_async(method: &str) -> bool {
                ::core::matches!(method, #(#async_names)|*)
            }

            fn dispatch_async<'m>(
                self: ::std::sync::Arc<Self>,
                msg: ::commissaire_plugin_api::Message<'m>,
                method: &str,
                params: ::std::string::String,
            ) -> ::core::option::Option<::commissaire_plugin_api::__private::HandlerFuture<'m>> {
                let _ = &msg;
                match method {
                    #(#async_arms)*
                    _ => ::core::option::Option::None,
                }
            }
        }
    });

    let methods_json = serde_json::Value::Array(
        methods
            .iter()
            .map(|m| {
                let mut method = serde_json::json!({
                    "name": m.bus_name,
                    "doc": m.doc,
                    "params": m.params.iter().map(|p| serde_json::json!({
                        "name": p.ident.to_string(),
                        "type": type_text(&p.ty),
                        "optional": p.optional,
                    })).collect::<Vec<_>>(),
                    "returns": m.returns,
                });
                // Only when true: older hosts and listings know no such key.
                if m.is_async {
                    method["async"] = serde_json::Value::Bool(true);
                }
                method
            })
            .collect(),
    )
    .to_string();
    let description = doc_text(&block.attrs);
    let contract = contract_fn(&methods);
    let export_name = syn::Ident::new(
        &abi_stable_shared::mangled_root_module_loader_name(),
        Span::call_site(),
    );

    Ok(quote! {
        #block

        impl ::commissaire_plugin_api::__private::ServiceImpl for #self_ty {
            const NAME: &'static str = #name;
            const VERSION: &'static str = ::core::env!("CARGO_PKG_VERSION");
            const DESCRIPTION: &'static str = #description;
            const METHODS_JSON: &'static str = #methods_json;
            const PANIC_UNWIND: bool = ::core::cfg!(panic = "unwind");

            fn construct(
                config: ::commissaire_plugin_api::serde_json::Value,
            ) -> ::core::result::Result<Self, ::commissaire_plugin_api::RpcError> {
                #construct
            }

            fn dispatch(
                &self,
                msg: &::commissaire_plugin_api::Message<'_>,
                method: &str,
                params: &str,
            ) -> ::core::result::Result<::std::string::String, ::commissaire_plugin_api::RpcError> {
                match method {
                    #(#arms)*
                    _ => ::core::result::Result::Err(
                        ::commissaire_plugin_api::RpcError::method_not_found(method),
                    ),
                }
            }

            #contract

            #async_entries
        }

        const _: () = {
            // The symbol abi_stable's loader looks for.
            #[no_mangle]
            pub static #export_name: ::commissaire_plugin_api::__private::LibHeader =
                ::commissaire_plugin_api::__private::lib_header::<#self_ty>();
        };
    })
}

fn parse_method(f: &ImplItemFn, bus_name: &str) -> syn::Result<Method> {
    let sig = &f.sig;
    let shape = "expected `[async] fn on_<method>(&self, [msg: &Message,] args…) -> Result<T, E>`";
    if bus_name.is_empty() {
        return Err(syn::Error::new(
            sig.ident.span(),
            "`on_` needs a method name after it",
        ));
    }
    if bus_name == "rpc_discover" {
        return Err(syn::Error::new(
            sig.ident.span(),
            "`rpc_discover` is answered by the host with the service's contract; \
             choose another name",
        ));
    }
    let mut inputs = sig.inputs.iter().peekable();
    match inputs.next() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() => {}
        Some(other) => {
            return Err(syn::Error::new_spanned(
                other,
                format!("a handler takes `&self` first: {shape}"),
            ))
        }
        None => {
            return Err(syn::Error::new(
                sig.paren_token.span.join(),
                format!("a handler takes `&self` first: {shape}"),
            ))
        }
    }
    let takes_msg = match inputs.peek() {
        Some(FnArg::Typed(t)) if is_message_ref(&t.ty) => {
            inputs.next();
            true
        }
        _ => false,
    };
    let mut params = Vec::new();
    for input in inputs {
        let FnArg::Typed(t) = input else {
            return Err(syn::Error::new_spanned(input, shape));
        };
        if is_message_ref(&t.ty) {
            return Err(syn::Error::new_spanned(
                &t.ty,
                "`msg: &Message` comes right after `&self`",
            ));
        }
        if let Type::Reference(r) = &*t.ty {
            let hint = if params.is_empty() && !takes_msg {
                "only `msg: &Message` may come right after `&self`; "
            } else {
                ""
            };
            return Err(syn::Error::new_spanned(
                r,
                format!(
                    "{hint}handler arguments are decoded from JSON and taken by value \
                     (`String`, not `&str`)"
                ),
            ));
        }
        let Pat::Ident(pat) = &*t.pat else {
            return Err(syn::Error::new(
                t.pat.span(),
                "handler arguments must be plain names: they are the bus argument names",
            ));
        };
        params.push(Param {
            ident: pat.ident.clone(),
            ty: (*t.ty).clone(),
            optional: is_option(&t.ty),
        });
    }
    let (returns, output, ok) = match &sig.output {
        ReturnType::Type(_, ty) => {
            let ok = result_ok_type(ty).ok_or_else(|| {
                syn::Error::new_spanned(ty, format!("a handler returns a `Result`: {shape}"))
            })?;
            (type_text(ok), (**ty).clone(), ok.clone())
        }
        ReturnType::Default => {
            return Err(syn::Error::new(
                sig.ident.span(),
                format!("a handler returns a `Result`: {shape}"),
            ))
        }
    };
    let mut errors = Vec::new();
    let mut notification = false;
    for attr in &f.attrs {
        if attr.path().is_ident("rpc_error") {
            let args = attr.parse_args_with(
                syn::punctuated::Punctuated::<Expr, syn::Token![,]>::parse_terminated,
            )?;
            let mut args = args.into_iter();
            let code = args.next();
            let message = match args.next() {
                Some(Expr::Lit(ExprLit {
                    lit: Lit::Str(s), ..
                })) => Some(s),
                _ => None,
            };
            match (code, message, args.next()) {
                (Some(code), Some(message), None) => errors.push((code, message)),
                _ => {
                    return Err(syn::Error::new_spanned(
                        attr,
                        "expected `#[rpc_error(CODE, \"message\")]`, e.g. \
                         `#[rpc_error(-32004, \"no such host\")]`",
                    ))
                }
            }
        } else if attr.path().is_ident("notification") {
            if !matches!(attr.meta, Meta::Path(_)) {
                return Err(syn::Error::new_spanned(
                    attr,
                    "`#[notification]` takes no arguments",
                ));
            }
            notification = true;
        }
    }
    Ok(Method {
        bus_name: bus_name.to_owned(),
        fn_ident: sig.ident.clone(),
        doc: doc_text(&f.attrs),
        takes_msg,
        is_async: sig.asyncness.is_some(),
        params,
        returns,
        output,
        ok,
        errors,
        notification,
    })
}

/// Removes `#[rpc_error]` and `#[notification]`, which only the contract
/// reads, from the handlers.
fn strip_contract_attributes(block: &mut ItemImpl) {
    for item in &mut block.items {
        let ImplItem::Fn(f) = item else { continue };
        if f.sig.ident.to_string().starts_with("on_") {
            f.attrs
                .retain(|a| !a.path().is_ident("rpc_error") && !a.path().is_ident("notification"));
        }
    }
}

/// `ServiceImpl::contract`: the service's OpenRPC document, built at its
/// first call. Each type's schema is chosen at that type (see `Probe` in
/// plugin-api): one without a JSON Schema is "any", with a deprecation
/// warning at the type as the author's build-time notice.
fn contract_fn(methods: &[Method]) -> TokenStream2 {
    let blocks = methods.iter().map(|m| {
        let schema = |ty: &Type| {
            quote_spanned! {ty.span()=>
                (&::commissaire_plugin_api::__private::contract::Probe::<#ty>::new())
                    .describe_schema(__builder.generator())
            }
        };
        let params = m.params.iter().map(|p| {
            let name = p.ident.to_string();
            let required = !p.optional;
            let schema = schema(&p.ty);
            quote!((#name, #required, #schema))
        });
        let result = schema(&m.ok);
        let name = &m.bus_name;
        let doc = &m.doc;
        let is_async = m.is_async;
        let notification = m.notification;
        let errors = m
            .errors
            .iter()
            .map(|(code, message)| quote!((#code, #message)));
        quote! {
            let __params = ::std::vec![#(#params),*];
            let __result = #result;
            __builder.method(
                ::commissaire_plugin_api::__private::contract::MethodSpec {
                    name: #name,
                    doc: #doc,
                    is_async: #is_async,
                    notification: #notification,
                    errors: &[#(#errors),*],
                },
                __params,
                __result,
            );
        }
    });
    quote! {
        // The borrow of each `Probe` picks its branch.
        #[allow(clippy::needless_borrow)]
        fn contract() -> &'static str {
            static CONTRACT: ::std::sync::OnceLock<::std::string::String> =
                ::std::sync::OnceLock::new();
            CONTRACT.get_or_init(|| {
                #[allow(unused_imports)]
                use ::commissaire_plugin_api::__private::contract::{
                    Described as _, Undescribed as _,
                };
                let mut __builder =
                    ::commissaire_plugin_api::__private::contract::ContractBuilder::new();
                #(#blocks)*
                __builder.finish(
                    <Self as ::commissaire_plugin_api::__private::ServiceImpl>::NAME,
                    <Self as ::commissaire_plugin_api::__private::ServiceImpl>::VERSION,
                    <Self as ::commissaire_plugin_api::__private::ServiceImpl>::DESCRIPTION,
                )
            })
        }
    }
}

/// Writes `&Message` as `&Message<'_>` in `async fn` handlers, where Rust
/// does not elide the lifetime of a path (E0726): authors write `&Message`
/// in both kinds alike.
fn elide_message_lifetimes(block: &mut ItemImpl) {
    for item in &mut block.items {
        let ImplItem::Fn(f) = item else { continue };
        if f.sig.asyncness.is_none() {
            continue;
        }
        for input in &mut f.sig.inputs {
            let FnArg::Typed(t) = input else { continue };
            if !is_message_ref(&t.ty) {
                continue;
            }
            if let Type::Reference(r) = &mut *t.ty {
                if let Type::Path(p) = &mut *r.elem {
                    if let Some(last) = p.path.segments.last_mut() {
                        if last.arguments.is_none() {
                            last.arguments = PathArguments::AngleBracketed(syn::parse_quote!(<'_>));
                        }
                    }
                }
            }
        }
    }
}

/// `&Message`, `&Message<'_>`, `&commissaire_plugin_api::Message<'a>`.
fn is_message_ref(ty: &Type) -> bool {
    let Type::Reference(r) = ty else { return false };
    if r.mutability.is_some() {
        return false;
    }
    match &*r.elem {
        Type::Path(p) => {
            p.qself.is_none() && p.path.segments.last().is_some_and(|s| s.ident == "Message")
        }
        _ => false,
    }
}

fn is_option(ty: &Type) -> bool {
    match ty {
        Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Option"),
        _ => false,
    }
}

fn result_ok_type(ty: &Type) -> Option<&Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    args.args.iter().find_map(|a| match a {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    })
}

/// A type as a person writes it: `Option<Vec<String>>`.
fn type_text(ty: &Type) -> String {
    let raw = quote!(#ty).to_string();
    let mut out = String::with_capacity(raw.len());
    for token in raw.split(' ') {
        let glue = matches!(token, "<" | ">" | "::" | "," | ")" | "]")
            || out.ends_with(['<', '(', '[', '&'])
            || out.ends_with("::");
        if !glue && !out.is_empty() {
            out.push(' ');
        }
        out.push_str(token);
        if token == "," {
            out.push(' ');
        }
    }
    out.replace(",  ", ", ").replace(", >", ",>")
}

fn doc_text(attrs: &[Attribute]) -> String {
    let lines: Vec<String> = attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .filter_map(|a| match &a.meta {
            Meta::NameValue(nv) => match &nv.value {
                Expr::Lit(ExprLit {
                    lit: Lit::Str(s), ..
                }) => Some(s.value().trim().to_owned()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    lines.join("\n").trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error `#[service(name = "t")]` reports on `item`, and the source
    /// text its span covers.
    fn error(item: &str) -> (String, String) {
        let item: TokenStream2 = item.parse().expect("test input is Rust");
        match expand(quote!(name = "t"), item) {
            Ok(_) => panic!("accepted"),
            Err(e) => {
                let covered = e.span().source_text().unwrap_or_default();
                (e.to_string(), covered)
            }
        }
    }

    fn accepted(item: &str) -> String {
        let item: TokenStream2 = item.parse().expect("test input is Rust");
        match expand(quote!(name = "t"), item) {
            Ok(tokens) => tokens.to_string(),
            Err(e) => panic!("refused: {e}"),
        }
    }

    #[test]
    fn msg_is_optional_and_recognised_by_its_type() {
        let out = accepted(
            "impl T {
                fn on_a(&self, x: i64) -> Result<i64, RpcError> { Ok(x) }
                fn on_b(&self, m: &Message, x: i64) -> Result<i64, RpcError> { Ok(x) }
                fn on_c(&self, _: &commissaire_plugin_api::Message<'_>) -> Result<(), RpcError> { Ok(()) }
            }",
        );
        assert!(out.contains("self . on_a (__args"), "{out}");
        assert!(out.contains("self . on_b (msg , __args"), "{out}");
        assert!(out.contains("self . on_c (msg ,)"), "{out}");
        // `msg` is not a bus argument.
        assert!(out.contains(r#"\"params\":[{\"name\":\"x\""#), "{out}");
    }

    #[test]
    fn another_reference_after_self_is_an_error_at_that_type() {
        let (message, covered) =
            error("impl T { fn on_a(&self, word: &str) -> Result<(), RpcError> { Ok(()) } }");
        assert!(
            message.starts_with("only `msg: &Message` may come right after `&self`"),
            "{message}"
        );
        assert_eq!(covered, "&str");
        let (message, covered) =
            error("impl T { fn on_a(&self, m: &mut Message) -> Result<(), RpcError> { Ok(()) } }");
        assert!(message.contains("taken by value"), "{message}");
        assert_eq!(covered, "&mut Message");
    }

    #[test]
    fn a_borrowed_argument_is_an_error_at_that_type() {
        let (message, covered) = error(
            "impl T { fn on_a(&self, m: &Message, x: i64, s: &[u8]) -> Result<(), RpcError> { Ok(()) } }",
        );
        assert_eq!(
            message,
            "handler arguments are decoded from JSON and taken by value (`String`, not `&str`)"
        );
        assert_eq!(covered, "&[u8]");
    }

    #[test]
    fn message_elsewhere_is_an_error() {
        let (message, covered) = error(
            "impl T { fn on_a(&self, x: i64, m: &Message) -> Result<(), RpcError> { Ok(()) } }",
        );
        assert_eq!(message, "`msg: &Message` comes right after `&self`");
        assert_eq!(covered, "&Message");
    }

    #[test]
    fn a_handler_without_self_or_result_is_refused() {
        let (message, covered) =
            error("impl T { fn on_a(x: i64) -> Result<(), RpcError> { Ok(()) } }");
        assert!(
            message.starts_with("a handler takes `&self` first"),
            "{message}"
        );
        assert_eq!(covered, "x: i64");
        let (message, covered) = error("impl T { fn on_a(&self) -> i64 { 1 } }");
        assert!(
            message.starts_with("a handler returns a `Result`"),
            "{message}"
        );
        assert_eq!(covered, "i64");
    }

    #[test]
    fn declared_errors_reach_the_contract_and_leave_the_handler() {
        let out = accepted(
            r#"impl T {
                #[rpc_error(-32004, "no such host")]
                #[rpc_error(CONFLICT, "taken")]
                fn on_a(&self) -> Result<(), RpcError> { Ok(()) }
            }"#,
        );
        assert!(
            out.contains(r#"errors : & [(- 32004 , "no such host") , (CONFLICT , "taken")]"#),
            "{out}"
        );
        // Only the contract reads it: no attribute of that name is left
        // for the compiler to reject.
        assert!(!out.contains("# [rpc_error"), "{out}");
    }

    #[test]
    fn a_malformed_rpc_error_is_an_error_at_that_attribute() {
        for attribute in [
            "#[rpc_error(-32004)]",
            r#"#[rpc_error("no such host", -32004)]"#,
            r#"#[rpc_error(-32004, "no such host", 1)]"#,
            "#[rpc_error(-32004, no_such_host)]",
        ] {
            let (message, covered) = error(&format!(
                "impl T {{ {attribute} fn on_a(&self) -> Result<(), RpcError> {{ Ok(()) }} }}"
            ));
            assert!(
                message.starts_with("expected `#[rpc_error(CODE, \"message\")]`"),
                "{attribute}: {message}"
            );
            assert_eq!(covered, attribute);
        }
        let (message, covered) =
            error("impl T { #[rpc_error] fn on_a(&self) -> Result<(), RpcError> { Ok(()) } }");
        assert!(message.contains("parentheses"), "{message}");
        assert_eq!(covered, "rpc_error");
    }

    #[test]
    fn rpc_discover_is_the_hosts_to_answer() {
        let (message, covered) =
            error("impl T { fn on_rpc_discover(&self) -> Result<(), RpcError> { Ok(()) } }");
        assert!(
            message.starts_with("`rpc_discover` is answered by the host"),
            "{message}"
        );
        assert_eq!(covered, "on_rpc_discover");
    }

    #[test]
    fn a_notification_is_marked_in_the_contract_only() {
        let out = accepted(
            "impl T {
                #[notification]
                fn on_tell(&self, x: i64) -> Result<(), RpcError> { Ok(()) }
                fn on_ask(&self) -> Result<(), RpcError> { Ok(()) }
            }",
        );
        assert!(
            out.contains(r#"name : "tell" , doc : "" , is_async : false , notification : true"#),
            "{out}"
        );
        assert!(
            out.contains(r#"name : "ask" , doc : "" , is_async : false , notification : false"#),
            "{out}"
        );
        assert!(!out.contains("# [notification]"), "{out}");
        let (message, covered) = error(
            "impl T { #[notification(always)] fn on_tell(&self) -> Result<(), RpcError> { Ok(()) } }",
        );
        assert_eq!(message, "`#[notification]` takes no arguments");
        assert_eq!(covered, "#[notification(always)]");
    }

    #[test]
    fn any_error_type_is_converted_at_the_return_type() {
        let out = accepted("impl T { fn on_a(&self) -> std::io::Result<u8> { Ok(1) } }");
        assert!(
            out.contains(". map_err (:: commissaire_plugin_api :: __private :: into_rpc_error) ?"),
            "{out}"
        );
        assert!(out.contains(r#"\"returns\":\"u8\""#), "{out}");
    }
}
